"""The public API (README, docs/) is importable under its documented names, whatever else was imported."""

import importlib
import os
import subprocess
import sys

import jax_peft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUBLIC = ["ViT", "ViTConfig", "vit_config", "load_checkpoint", "save_checkpoint", "get_method", "merge",
          "from_official", "to_official", "paths", "data", "analysis", "train"]
TRAINER = ["train_and_evaluate", "evaluate", "export", "default_config", "method_config"]


def test_public_names_resolve():
    for name in PUBLIC:
        assert getattr(jax_peft, name) is not None, name
    assert callable(jax_peft.merge) and callable(jax_peft.get_method)


def test_trainer_names_live_in_jax_peft_train():
    for name in TRAINER:
        assert callable(getattr(jax_peft.train, name)), name
        assert name not in dir(jax_peft), f"{name} is back in the top-level namespace"


def test_import_jax_peft_loads_no_jax():
    """`import jax_peft` (and the package's lazy names) imports JAX only when a JAX name is used."""
    code = ("import sys, jax_peft, jax_peft.train; assert 'jax' not in sys.modules, 'eager'; "
            "jax_peft.merge; assert 'jax' in sys.modules; "
            "import jax_peft.merge as m; assert callable(m) and callable(jax_peft.merge), m")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ROOT})


def test_merge_stays_the_function_after_submodule_imports():
    importlib.import_module("jax_peft.merge")
    importlib.import_module("jax_peft.analysis")
    assert callable(jax_peft.merge), "jax_peft.merge was rebound to its submodule"
    assert jax_peft.merge.__name__ == "merge"


def test_unknown_attribute_is_an_attribute_error():
    try:
        _ = jax_peft.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("expected AttributeError")
