"""Shared test set-up: `tests/` on sys.path (so `from formula import ...` works) and tiny fixtures.

Fixtures (generic and stable; other test files rely on them):
    data_dir          Path of tests/data (golden files)
    tiny_config       ViTConfig: patch 8, width 32, 2 blocks, 2 heads, MLP 64, 5 classes, 32x32 images
    tiny_params       a random canonical tree for tiny_config (numpy float32; a fresh copy per test;
                      see random_params, importable as `from conftest import random_params`)
    tiny_images       (2, 32, 32, 3) float32 images in [-1, 1]
    formula_flat      the depth-2 formula checkpoint as stored (flat pre-Linen keys -> numpy arrays)
    formula_npz       Path of that checkpoint written once per session as a pre-Linen .npz
    golden            golden(name) -> dict of the arrays in tests/data/<name>.npz
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The tests' tiny models spend their time in XLA compilation, not in running: compile them (and the
# CLI / notebook processes the tests start, which inherit this variable) without LLVM's optimisation
# passes, about half the CPU time of the suite. Results are the same programs (every tolerance and
# exactness check holds); set JAX_PEFT_TEST_XLA_OPT=default to test at the production level.
# This runs before anything imports jax (conftest is imported first in every test process).
if os.environ.get("JAX_PEFT_TEST_XLA_OPT", "fast") != "default" and \
        "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

DATA = TESTS / "data"


def xla_flags_with_cpu_devices(n: int) -> str:
    """This process's XLA_FLAGS with the host platform forced to `n` devices (for a child process)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def train_on_random_batches(runner, state, frozen, steps: int):
    """`steps` training steps of `runner` (jax_peft.train.step) on random uint8 (16, 32, 32, 3) batches
    with 5 classes (seed 0), as the training loop sends them (the runner needs `normalization=`):
    (state, losses, last host batch). Shared by the multi-device child processes."""
    rng = np.random.default_rng(0)
    losses, batch = [], None
    for _ in range(steps):
        batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                 "label": rng.integers(0, 5, (16,)).astype(np.int32)}
        state, m = runner.train(state, frozen, runner.put_batch(batch))
        losses.append(float(runner.get(m)["loss"]))
    return state, losses, batch


def tiny_vit_config(**overrides):
    """The tiny ViT used across the tests (keyword overrides allowed)."""
    import jax_peft

    kw = dict(patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, num_classes=5,
              image_size=32)
    kw.update(overrides)
    return jax_peft.vit_config(None, **kw)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_vit_config()


def random_params(config, seed: int = 0) -> dict:
    """A random canonical tree for `config` (numpy float32), without compiling anything.

    Shapes come from `jax_peft.param_shapes`; values are non-degenerate (LayerNorm scales near 1,
    non-zero biases and head, kernels ~ N(0, 1/fan_in)), so outputs depend on every leaf.
    """
    import jax_peft
    from jax_peft import paths

    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in paths.flatten(jax_peft.param_shapes(config)).items():
        shape = tuple(leaf.shape)
        name = path.rsplit("/", 1)[-1]
        if name == "scale":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "bias":
            v = 0.1 * rng.standard_normal(shape)
        elif name == "kernel":
            qkv = {"query", "key", "value"} & set(path.split("/"))  # (D, H, hd): fan-in is D
            fan_in = shape[0] if qkv else int(np.prod(shape[:-1]))
            v = rng.standard_normal(shape) / np.sqrt(fan_in)
        else:  # cls, pos_embedding
            v = 0.5 * rng.standard_normal(shape)
        out[path] = v.astype(np.float32)
    return paths.unflatten(out)


@pytest.fixture(scope="session")
def _tiny_params_np(tiny_config):
    return random_params(tiny_config, 0)


@pytest.fixture
def tiny_params(_tiny_params_np):
    import jax

    return jax.tree_util.tree_map(np.copy, _tiny_params_np)


@pytest.fixture(scope="session")
def tiny_images() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="session")
def formula_flat() -> dict:
    from formula import formula_checkpoint

    return formula_checkpoint(2)


@pytest.fixture(scope="session")
def formula_npz(tmp_path_factory, formula_flat) -> Path:
    path = tmp_path_factory.mktemp("formula") / "formula_d2.npz"
    np.savez(path, **formula_flat)
    return path


@pytest.fixture(scope="session")
def golden():
    cache: dict = {}

    def load(name: str) -> dict:
        if name not in cache:
            with np.load(DATA / f"{name}.npz", allow_pickle=False) as z:
                cache[name] = {k: z[k] for k in z.files}
        return cache[name]

    return load

