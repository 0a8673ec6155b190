"""Activation form of a method, derived from its edits: `x K + s · drop(x F_0 … F_j) F_{j+1} …` beside
the frozen K, and SSF-like `y ⊙ γ + β` on frozen outputs.

`method.apply` (the weight form) materializes `K + ΔK`; in training that costs a full-size weight
gradient per adapted matrix, and it cannot express the official activation dropout. The activation
form instead hands the backbone one hook per edited site and keeps the frozen kernels as they are::

    params, side = activation_form(method, params, adapter, rng=rng)
    logits = model.apply({"params": params}, images, train=True, side=side,
                         rngs={"dropout": key})

It is built from `method.edits` with no knowledge of the method (see `jax_peft.methods.edits`):

* a `LowRank` edit on a site with a hook becomes a `vit.SidePath` (factors, scale, dropout position);
  factors whose rows divide the width act chunk-wise (FacT's MLP blocks; FacT's fused q|k|v path);
  one on a *slice* site (the Swin's q, k, v: columns of its fused qkv layer) becomes a path on the
  parent's hook that keeps its own width and is placed at the slice's columns (`SidePath.columns`;
  paths sharing a hook are summed);
* an `OutputAffine` edit on a site with a hook becomes a `vit.ScaleShift` (key "<hook>_ssf"): γ and β
  get their gradients from the outputs, so no weight gradient is formed;
* every other edit (output affine on norms / the patch embedding, ...) is folded into the parameters
  by the weight form: a few vectors and one small conv kernel.

Methods with edit kinds that have no activation form (RLRR's rescaling, BitFit's and full
fine-tuning's replacements, linear probing's nothing) raise and are told to use `method.apply`.
Eval logits equal the weight form's (and, with dropout off, so do the adapter gradients).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jax_peft import scan
from jax_peft import sites as sites_lib
from jax_peft.methods.base import Method, check_adapter, method_class, method_names
from jax_peft.methods.edits import LowRank, OutputAffine, apply_edits
from jax_peft.vit import ScaleShift, SidePath

Tree = Mapping[str, Any]
Side = dict[int, dict[str, SidePath | tuple[SidePath, ...] | ScaleShift]]


def supports_activation_form(method: Method) -> bool:
    """True for the methods whose every edit kind has an activation form (`Method.has_activation_form`)."""
    return method.has_activation_form()


def activation_form(method: Method, params: Tree, adapter: Tree, *,
                    rng: jax.Array | None = None) -> tuple[Tree, Side]:
    """(params, side) for `ViT.apply(..., side=side)`: the frozen parameters (returned as given when
    no edit needs folding; otherwise with those edits folded in) and the hooks,
    `{block: {"q"|"k"|"v"|"o"|"fc1"|"fc2"|"qkv": SidePath, "<key>_ssf": ScaleShift}}`.

    `rng` is used only by methods whose training noise lives in the factors (EFFT); pass the same
    key as to `method.apply(..., rng=rng)` to draw the same masks. Activation dropout (FacT, LoRA) is
    drawn by the model from its "dropout" rng (`rngs={"dropout": key}`).
    """
    if not supports_activation_form(method):
        having = [n for n in method_names() if method_class(n).has_activation_form()]
        raise ValueError(
            f"method {method.name!r} has no activation form (available for: {', '.join(having)}); "
            f"use the weight form, model.apply({{'params': method.apply(params, adapter)}}, ...)")
    check_adapter(method, params, adapter)
    site_map = sites_lib.sites(params)
    side: Side = {}
    folded = {}
    for key, edit in method.edits(params, adapter, rng=rng).items():
        site = site_map.get(key)
        hook = site.hook if site is not None else None
        factors = tuple(edit.factors) if isinstance(edit, LowRank) else ()
        columns = None
        if hook is None and factors and site.parent is not None and site_map[site.parent].hook is not None:
            parent = site_map[site.parent]
            hook, columns = parent.hook, (site.offset, parent.d_out)
        if hook is not None and isinstance(edit, LowRank):
            path = SidePath(factors, scale=float(edit.scale), dropout=float(edit.dropout),
                            dropout_after=int(edit.dropout_after), columns=columns)
            hooks = side.setdefault(hook[0], {})
            hooks[hook[1]] = path if hook[1] not in hooks else _as_tuple(hooks[hook[1]]) + (path,)
        elif hook is not None and isinstance(edit, OutputAffine):
            side.setdefault(hook[0], {})[f"{hook[1]}_ssf"] = ScaleShift(edit.scale, edit.shift)
        else:
            folded[key] = edit
    return (apply_edits(params, folded, site_map) if folded else params), side


def _as_tuple(paths: SidePath | tuple[SidePath, ...]) -> tuple[SidePath, ...]:
    return paths if isinstance(paths, tuple) else (paths,)


def forward(model: Any, method: Method, params: Tree, adapter: Tree, images: jax.Array, *,
            train: bool = False, rng: jax.Array | None = None, form: str = "auto") -> jax.Array:
    """Logits (B, C) of `model` with `method`'s adapter, in the chosen execution form.

    form: "activation" (frozen kernels + side paths), "weight" (`method.apply`), or "auto"
    (activation form where the method has one: the cheaper form in training, and the only one with
    the official activation dropout). With `train=True`, `rng` is split into the model's "dropout"
    key and the method's key (EFFT's factor dropout), as the training step does.

    For a scanned model (`config.scan=True`) `params` may be canonical or stacked (`jax_peft.scan`):
    the method always sees the canonical tree (under jit, the per-block views it reads cost nothing)
    and the model the stacked one; pass them stacked so the frozen tree is not re-stacked per call.
    """
    if form not in ("auto", "activation", "weight"):
        raise ValueError(f"unknown execution form {form!r}; use 'auto', 'activation' or 'weight'")
    if form == "auto":
        form = "activation" if supports_activation_form(method) else "weight"
    if train and rng is None:
        raise ValueError("train=True needs rng= (dropout keys); pass jax.random.PRNGKey(...)")
    k_model, k_method = jax.random.split(rng) if train else (None, None)
    rngs = {"dropout": k_model} if train else {}
    scanned = bool(getattr(getattr(model, "config", None), "scan", False))
    given_stacked = scanned and scan.STACKED in params.get("Transformer", {})
    canonical = scan.unstack_blocks(params) if given_stacked else params
    if form == "activation":
        p, side = activation_form(method, canonical, adapter, rng=k_method)
        if p is canonical:  # frozen tree unchanged (low-rank methods): use it as given
            p = scan.stack_blocks(params) if scanned and not given_stacked else params
        elif scanned:  # SSF's folded norms: re-stacked per call
            p = scan.stack_blocks(p)
        return model.apply({"params": p}, images, train=train, side=side, rngs=rngs)
    eff = method.apply(canonical, adapter, rng=k_method)
    eff = scan.stack_blocks(eff) if scanned else eff
    return model.apply({"params": eff}, images, train=train, rngs=rngs)
