"""The public API of design.md is importable under its documented names, whatever else was imported."""

import importlib

import jax_peft

PUBLIC = ["ViT", "ViTConfig", "vit_config", "load_checkpoint", "save_checkpoint", "get_method", "merge",
          "from_official", "to_official", "paths", "data", "analysis", "train_and_evaluate"]


def test_public_names_resolve():
    for name in PUBLIC:
        assert getattr(jax_peft, name) is not None, name
    assert callable(jax_peft.merge) and callable(jax_peft.get_method)


def test_merge_stays_the_function_after_submodule_imports():
    importlib.import_module("jax_peft.merge")
    importlib.import_module("jax_peft.analysis")
    assert callable(jax_peft.merge), "jax_peft.merge was rebound to its submodule"
    assert jax_peft.merge.__name__ == "merge"


def test_unknown_attribute_is_an_attribute_error():
    try:
        jax_peft.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("expected AttributeError")
