"""The modules of jax_peft.configs build for every cell and carry the published per-dataset settings."""

import pytest

from jax_peft.configs import demo, fewshot, fgvc, smoke, vtab1k
from jax_peft.configs import recipes as R
from jax_peft.methods import base


def _method_available(name):
    try:
        base.method_class(name)
        return True
    except (ImportError, AttributeError):
        return False


@pytest.mark.parametrize("method", R.METHODS)
def test_every_vtab_cell_builds(method):
    from jax_peft import data

    for task in R.VTAB_TASKS:
        c = vtab1k.get_config(f"{task},{method}")
        assert c.data.name == f"vtab/{task}" and c.method.name == method
        assert c.model.num_classes == data.num_classes(c.data.name)
        assert c.data.train_split == "train800val200" and c.data.eval_split == "test"
        assert c.data.image_size == c.model.image_size == 224
        assert c.eval_every > 0 and c.num_epochs in (100, 110)
    if _method_available(method):  # the method's hyper-parameter names are accepted
        hp = {k: v for k, v in c.method.to_dict().items() if k != "name"}
        base.get_method(method, **hp)


def test_rlrr_recipe_spot_checks():
    c = vtab1k.get_config("cifar,rlrr")
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.model.drop_path_rate) == (3e-3, 5e-5, 0.1)
    assert c.data.hflip is False and c.batch_size == 32 and c.num_epochs == 110
    assert c.model.drop_path_mode == "element" and c.data.normalization == "minus_one_one"
    s = c.schedule
    assert (s.kind, s.warmup_epochs, s.warmup_lr, s.min_lr, s.cosine_epochs, s.step_offset) == (
        "timm_epoch", 10, 1e-7, 1e-8, 100, "after_epoch")
    c = vtab1k.get_config("clevr_count,rlrr")
    assert (c.optimizer.lr, c.model.drop_path_rate, c.data.hflip) == (5e-3, 0.5, True)
    c = vtab1k.get_config("smallnorb_azi,rlrr")
    assert (c.optimizer.weight_decay, c.data.hflip) == (5e-2, False)
    assert sum(vtab1k.get_config(f"{t},rlrr").data.hflip for t in R.VTAB_TASKS) == 10
    assert vtab1k.get_config("resisc45,rlrr").model.drop_path_rate == 0.0


def test_fact_efft_ssf_lora_spot_checks():
    c = vtab1k.get_config("caltech101,fact_tt")
    assert (c.method.rank, c.method.scale) == (16, 10.0)
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.batch_size, c.num_epochs) == (1e-3, 1e-4, 64, 100)
    assert (c.schedule.warmup_lr, c.schedule.min_lr) == (1e-6, 1e-5)
    assert c.data.normalization == "imagenet" and c.model.drop_path_rate == 0.1
    assert c.model.drop_path_mode == "sample" and c.eval_every == 150
    assert (vtab1k.get_config("clevr_dist,fact_tt").method.rank, vtab1k.get_config("dtd,fact_tt").method.scale) == (4, 0.01)
    c = vtab1k.get_config("oxford_iiit_pet,fact_tk")
    assert (c.method.rank, c.method.scale) == (16, 10.0)
    c = vtab1k.get_config("svhn,efft")
    assert (c.method.rank, c.method.scale, c.method.init) == (32, 80.0, "vu")
    c = vtab1k.get_config("clevr_dist,ssf")
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.model.drop_path_rate) == (5e-2, 5e-2, 0.1)
    assert c.model.checkpoint == "augreg/ViT-B_16" and c.schedule.step_offset == "before_epoch"
    assert c.num_epochs == 110 and c.data.normalization == "minus_one_one"
    c = vtab1k.get_config("kitti,lora")
    assert (c.method.rank, c.method.variant) == (8, "fused_qkv")
    c = vtab1k.get_config("dtd,full")
    assert c.optimizer.name == "adamw" and c.data.interpolation == "bilinear"
    assert vtab1k.get_config("dtd,linear").optimizer.name == "sgd"


def test_paper_numbers_and_means():
    P = vtab1k.PAPER_RESULTS
    assert P["rlrr"]["cifar100"] == 75.6 and P["rlrr"]["smallnorb_ele"] == 43.6
    assert P["fact_tt"]["caltech101"] == 89.6 and P["ssf"]["sun397"] == 52.9
    for m, expected_plain, expected_group in [("rlrr", 74.54, 76.75), ("fact_tt", 73.04, 75.34),
                                              ("lora", 72.25, 74.60), ("full", 65.57, 68.97)]:
        vals = P[m]
        plain = sum(vals.values()) / 19
        groups = [sum(vals[t] for t in g) / len(g) for g in R.VTAB_GROUPS.values()]
        assert round(plain, 2) == expected_plain and round(sum(groups) / 3, 2) == expected_group
    assert "| cifar100 | 75.6 |" in vtab1k.__doc__


def test_bad_arguments():
    with pytest.raises(ValueError, match="task,method"):
        vtab1k.get_config("cifar100")
    with pytest.raises(ValueError, match="valid tasks"):
        vtab1k.get_config("imagenet,rlrr")
    with pytest.raises(ValueError, match="valid methods"):
        vtab1k.get_config("cifar100,adapter")




def test_fgvc_configs():
    from jax_peft import data

    for ds in fgvc.DATASETS:
        for method in R.METHODS:
            c = fgvc.get_config(f"{ds},{method}")
            assert c.data.name == f"fgvc/{ds}" and c.model.num_classes == data.num_classes(c.data.name)
            assert (c.data.train_split, c.data.eval_split) == ("trainval", "test")
            if _method_available(method):
                base.get_method(method, **{k: v for k, v in c.method.to_dict().items() if k != "name"})
    c = fgvc.get_config("nabirds,rlrr")
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.model.drop_path_rate) == (5e-4, 5e-2, 0.3)
    assert (c.batch_size, c.num_epochs, c.schedule.cosine_epochs) == (32, 60, 50)
    assert c.data.hflip and c.data.normalization == "minus_one_one" and c.model.drop_path_mode == "element"
    assert fgvc.get_config("stanford_dogs,rlrr").optimizer.lr == 1e-4
    assert fgvc.PAPER_RESULTS["rlrr"]["stanford_dogs"] == 92.0
    with pytest.raises(ValueError, match="valid datasets"):
        fgvc.get_config("aircraft,rlrr")


def test_fewshot_configs():
    from jax_peft import data

    for ds in fewshot.DATASETS:
        for k in fewshot.SHOTS:
            c = fewshot.get_config(f"{ds},{k},2,fact_tt")
            assert c.data.train_split == f"train_{k}shot_seed2"
            assert data.dataset_info(c.data.name, c.data.train_split)["num_examples"] == k * c.model.num_classes
            assert c.batch_size <= k * c.model.num_classes and c.batch_size <= 64
    for method in fewshot.METHODS:
        c = fewshot.get_config(f"food101,16,0,{method}")
        if _method_available(method):
            base.get_method(method, **{k: v for k, v in c.method.to_dict().items() if k != "name"})
    c = fewshot.get_config("food101,16,0,fact_tt")
    assert (c.method.rank, c.optimizer.lr, c.optimizer.weight_decay, c.batch_size) == (16, 5e-3, 1e-4, 64)
    assert c.data.random_resized_crop and c.data.hflip and c.data.normalization == "imagenet"
    assert fewshot.get_config("oxford_iiit_pet,1,0,lora").batch_size == 37
    with pytest.raises(ValueError, match="shots must be one of"):
        fewshot.get_config("food101,3,0,lora")


def test_config_flag_takes_a_module_or_a_file(tmp_path):
    import os

    from jax_peft.main import _resolve_config_argv
    from jax_peft.train.config import resolve_config

    smoke_file = os.path.abspath(smoke.__file__)
    assert resolve_config("jax_peft.configs.smoke:lora") == smoke_file + ":lora"
    assert resolve_config("jax_peft.configs.vtab1k:dtd,rlrr") == os.path.abspath(vtab1k.__file__) + ":dtd,rlrr"
    assert resolve_config(smoke_file) == smoke_file
    assert _resolve_config_argv(["m", "--config", "jax_peft.configs.smoke", "--config=jax_peft.configs.demo:rlrr",
                                 "--workdir=jax_peft.configs.smoke"]) == [
        "m", "--config", smoke_file, f"--config={os.path.abspath(demo.__file__)}:rlrr", "--workdir=jax_peft.configs.smoke"]
    with pytest.raises(ValueError, match="use --config jax_peft.configs.vtab1k:cifar100,rlrr"):
        resolve_config("configs/vtab1k.py:cifar100,rlrr")  # the old location names the new one
    with pytest.raises(ValueError, match="jax_peft.configs.fewshot"):
        resolve_config("jax_peft.configs.vtab1kk:cifar100,rlrr")  # lists the package's configs
