"""From a training config to (model, method, base parameters, data sources).

* Parameters: `jax_peft.load_checkpoint(config.model.checkpoint, lazy=True)` (a short name, path or
  URL; an `.npz` stays on disk until the frozen leaves are placed, each device reading its slice), or a
  random initialization when `config.model.checkpoint` is "" or "random" (architecture from
  `config.model.name` and/or the explicit `patch_size`, `hidden_size`, ... fields). The head is
  always replaced by a fresh one for the dataset's classes, initialized the method's official way
  (`method.init_head`).
* Swin Transformer: a Swin `config.model.name` ("Swin-B", "swin_base_patch4_window7_224", ...) or a
  checkpoint that holds a Swin tree gives a `jax_peft.Swin` (`build_model`); with the ViT's default
  checkpoint left in place, a Swin name loads that size's released file (`SWIN_CHECKPOINTS`).
* Method: `jax_peft.get_method(config.method.name, **other method fields)`.
* Data: `jax_peft.data.make_dataset` / `dataset_info` (names starting with `synthetic/` go to
  `jax_peft.data.synthetic`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jax_peft import vit
from jax_peft.lazy_npz import LazyArray
from jax_peft.methods.base import Method, get_method
from jax_peft.train import distributed

RANDOM_INIT = ("", "random", "none", None)
# The released file a Swin name loads when config.model.checkpoint is left at the ViT default
# (ImageNet-22k pre-training for B and L, as the RLRR, FacT and EFFT Swin tables; T and S: ImageNet-1k).
SWIN_CHECKPOINTS = {"Swin-T": "swin_tiny_patch4_window7_224", "Swin-S": "swin_small_patch4_window7_224",
                    "Swin-B": "swin_base_patch4_window7_224_22k", "Swin-L": "swin_large_patch4_window7_224_22k",
                    "Swin-B-384": "swin_base_patch4_window12_384_22k",
                    "Swin-L-384": "swin_large_patch4_window12_384_22k"}
_VIT_DEFAULT_CHECKPOINT = "ViT-B_16"
_ARCH = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")


# --------------------------------------------------------------------------------------- data
def data_api() -> tuple[Callable[..., Iterator[dict]], Callable[..., dict]]:
    """(make_dataset, dataset_info) of `jax_peft.data` (imported on first use: it pulls in TFDS)."""
    from jax_peft import data

    return data.make_dataset, data.dataset_info


def dataset_info(config: Any, split: str) -> dict:
    return data_api()[1](config.data.name, split, data_dir=config.data.data_dir)


def make_dataset(config: Any, split: str, *, train: bool, start_batch: int = 0,
                 batch_size: int | None = None, normalize: bool = False) -> Iterator[dict]:
    """This process's batches of `split`: `batch_size` (default `config.batch_size`) is the GLOBAL
    batch; each of the `jax.process_count()` processes loads its disjoint share of every batch.
    Images are uint8, normalized by the jitted steps (`make_runner(normalization=...)`); pass
    `normalize=True` for float32 images normalized on the host (`config.data.normalization`)."""
    d = config.data
    kwargs = dict(
        batch_size=distributed.per_process_batch_size(int(batch_size or config.batch_size)),
        image_size=int(d.image_size), train=train,
        seed=int(config.seed), normalization=d.normalization, interpolation=d.interpolation,
        hflip=bool(d.hflip) and train, random_resized_crop=bool(d.random_resized_crop) and train,
        data_dir=d.data_dir, start_batch=int(start_batch), prefetch=int(d.prefetch),
        cache=bool(d.cache), cache_dir=d.cache_dir or None, cache_max_gb=float(d.cache_max_gb),
        worker_processes=None if int(d.worker_processes) < 0 else int(d.worker_processes),
        normalize=bool(normalize),
    )
    if train and not bool(d.drop_remainder):
        kwargs["drop_remainder"] = False
    kwargs.update(process_index=jax.process_index(), process_count=jax.process_count())
    return data_api()[0](d.name, split, **kwargs)


# ------------------------------------------------------------------------------------- method
def build_method(config: Any) -> Method:
    hparams = {k: v for k, v in config.method.to_dict().items() if k != "name"}
    return get_method(config.method.name, **hparams)


# ------------------------------------------------------------------------------------- params
def _regularization(config: Any) -> dict:
    m = config.model
    return dict(gelu=m.gelu, drop_path_rate=float(m.drop_path_rate), drop_path_mode=m.drop_path_mode,
                dropout_rate=float(m.dropout_rate), remat=bool(m.remat), scan=bool(m.scan),
                dtype=config.compute_dtype)


def _check_image_sizes(config: Any) -> int:
    if int(config.model.image_size) != int(config.data.image_size):
        raise ValueError(
            f"config.model.image_size ({config.model.image_size}) differs from config.data.image_size "
            f"({config.data.image_size}); set both to the input resolution")
    return int(config.model.image_size)


def random_config(config: Any, num_classes: int) -> vit.ViTConfig:
    """ViTConfig of a randomly initialized model from `config.model`."""
    m = config.model
    arch = {k: int(getattr(m, k)) for k in _ARCH if int(getattr(m, k)) > 0}
    name = m.name or None
    if name is None and len(arch) < len(_ARCH):
        missing = [k for k in _ARCH if k not in arch]
        raise ValueError(f"random init without config.model.name needs config.model.{{{', '.join(missing)}}}")
    return vit.vit_config(name, num_classes=num_classes, image_size=_check_image_sizes(config),
                          classifier=m.classifier, **arch, **_regularization(config))


def swin_name(name: str | None) -> str | None:
    """The canonical Swin name ("Swin-B", ...) of `config.model.name`, or None for a non-Swin name."""
    from jax_peft import swin

    canon = swin._canonical_name(name) if name else None
    return canon if canon in swin.NAMED_CONFIGS else None


def build_model(cfg: Any) -> Any:
    """The Flax module of a model config: `Swin` for a `SwinConfig`, `ViT` otherwise."""
    from jax_peft import swin

    return swin.Swin(cfg) if isinstance(cfg, swin.SwinConfig) else vit.ViT(cfg)


def _swin_params(config: Any, params: Any, num_classes: int, rng: jax.Array) -> tuple[Any, dict]:
    """(SwinConfig, params) from a loaded Swin tree, or a random init of `config.model.name` (params None)."""
    from jax_peft import swin

    m = config.model
    if bool(m.scan):
        raise ValueError("config.model.scan is for the ViT; the Swin has no scanned layout: set "
                         "--config.model.scan=False")
    reg = dict(gelu=m.gelu, drop_path_rate=float(m.drop_path_rate), drop_path_mode=m.drop_path_mode,
               dropout_rate=float(m.dropout_rate), remat=bool(m.remat), dtype=config.compute_dtype)
    image_size = _check_image_sizes(config)
    if params is None:
        cfg = swin.swin_config(swin_name(m.name), num_classes=num_classes, image_size=image_size, **reg)
        return cfg, swin.init_params(cfg, rng)
    cfg = swin.swin_config(params, num_classes=num_classes, image_size=image_size, **reg)
    wanted = swin_name(m.name)
    if m.name and wanted is None:
        raise ValueError(f"checkpoint {m.checkpoint!r} is a Swin Transformer, but config.model.name is {m.name!r}; "
                         "set --config.model.name to its Swin name (e.g. Swin-B) or ''")
    have = swin.swin_config(params)
    if wanted is not None and (have.embed_dim, have.depths) != (swin.NAMED_CONFIGS[wanted][0],
                                                                 swin.NAMED_CONFIGS[wanted][1]):
        raise ValueError(f"checkpoint {m.checkpoint!r} is not a {wanted} (width {have.embed_dim}, depths "
                         f"{have.depths}); fix config.model.name or config.model.checkpoint (or set the name to '')")
    return cfg, swin.adapt_to_config(params, cfg, head="reset")


def build_params(config: Any, method: Method, num_classes: int, rng: jax.Array, *,
                 lazy: bool = False) -> tuple[Any, dict]:
    """(model config, params) with a fresh `method.init_head` head for `num_classes` classes: a
    `ViTConfig`, or a `SwinConfig` for a Swin name or checkpoint. Leaves are numpy arrays; with
    `lazy=True` an `.npz` file's leaves stay `lazy_npz.LazyArray`s on disk (the training loop places
    them on the devices slice by slice); `np.asarray(leaf)` reads one."""
    r_init, r_head = jax.random.split(rng)
    ckpt = config.model.checkpoint
    image_size = _check_image_sizes(config)
    swin = swin_name(config.model.name)
    if swin is not None and ckpt == _VIT_DEFAULT_CHECKPOINT:
        ckpt = SWIN_CHECKPOINTS[swin]
    random = ckpt in RANDOM_INIT or (isinstance(ckpt, str) and ckpt.lower() in RANDOM_INIT)
    if random and swin is not None:
        cfg, params = _swin_params(config, None, num_classes, r_init)
    elif random:
        cfg = random_config(config, num_classes)
        # canonical per-block layout whatever cfg.scan (methods and checkpoints use it; the loop
        # stacks the frozen tree for a scanned model): a scanned run starts from the same weights
        params = vit.init_params(dataclasses.replace(cfg, scan=False), r_init)
    else:
        from jax_peft import checkpoint as ck  # written by another module; imported on use
        from jax_peft.swin import is_swin_params

        # lazily: the frozen leaves are read slice by slice when placed on the devices (Setup.device_frozen)
        params = ck.load_checkpoint(ckpt, lazy=lazy)
        if is_swin_params(params):
            cfg, params = _swin_params(config, params, num_classes, r_init)
        elif swin is not None:
            raise ValueError(f"config.model.name is {config.model.name!r}, but checkpoint {ckpt!r} is not a Swin "
                             "tree; give a Swin checkpoint (e.g. swin_base_patch4_window7_224_22k) or a ViT name")
        else:
            stored = vit.infer_config(params)
            name = config.model.name
            if name and vit._canonical_name(name) in vit.NAMED_CONFIGS and stored.name != "custom" \
                    and stored.name != vit._canonical_name(name):
                raise ValueError(f"checkpoint {ckpt!r} is a {stored.name}, but config.model.name is "
                                 f"{name!r}; fix one of them (or set config.model.name='')")
            # vit_jax's fine-tuning load (as the PEFT codebases): pre_logits dropped, position
            # embedding resized to the input grid, and a new head (re-initialized below).
            cfg = vit.vit_config(params, num_classes=num_classes, image_size=image_size,
                                 representation_size=None, **_regularization(config))
            # checked and adapted in the canonical layout, as the random init (the loop stacks it for scan)
            params = ck.adapt_to_config(params, dataclasses.replace(cfg, scan=False), head="reset")
    width = getattr(cfg, "representation_size", None) or cfg.hidden_size
    params = dict(params)
    params["head"] = method.init_head(r_head, width, num_classes)
    params = jax.tree_util.tree_map(
        lambda x: x.astype(np.float32) if isinstance(x, LazyArray) else np.asarray(x, np.float32), params)
    return dataclasses.replace(cfg, num_classes=num_classes), params
