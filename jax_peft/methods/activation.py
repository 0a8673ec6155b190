"""Activation form of the low-rank methods: `x K + s · drop(x F_0 … F_j) F_{j+1} …` beside the frozen K.

`method.apply` (the weight form) materializes `K + ΔK`; in training that costs a full-size weight
gradient per adapted matrix, and it cannot express the official activation dropout. The activation
form instead hands the ViT one `vit.SidePath` per adapted matrix and keeps the frozen kernels as they
are::

    params, side = activation_form(method, params, adapter, rng=rng)
    logits = model.apply({"params": params}, images, train=True, side=side,
                         rngs={"dropout": key})

Eval logits equal the weight form's (and, with dropout off, so do the adapter gradients); the
factors are read from the adapter leaves exactly as each method's `apply` builds its increments.

Where the training-time dropout sits (as in the official code):

* FacT-TT / FacT-TK: `Dropout(method.dropout)` on the rank-r activation after the core, before V
  (`dropout_after=1`). The MLP kernels are chunked into k = M/D square blocks: fc1 runs as
  `(x U T1) → drop → kron(I_k, V)` (the (r·k)-wide activation split into k chunks, each times V),
  fc2 as `h kron(I_k, U) → T2 → drop → V` (h split into k chunks of D, each times U). The
  block-diagonal kron(I_k, ·) is never built: a SidePath factor whose rows divide the current width
  acts chunk-wise.
* LoRA: `Dropout(method.dropout)` on the LoRA input x (`dropout_after=-1`); the fused-qkv variant
  is one "qkv" path, so q, k and v share the mask (NOAH draws one).
* EFFT: dropout acts on the factor *entries*; the factors are dropped first with `rng`, exactly as
  `EFFT.apply(params, adapter, rng=rng)` drops them, and the side paths carry no activation dropout.

* SSF: `y ⊙ γ + β` on the outputs of the frozen q|k|v, out, fc1 and fc2 linears (`vit.ScaleShift`):
  γ and β get their gradients from the outputs, so no weight gradient is formed (the weight form
  folds γ into K and pays for dK); the LayerNorm, patch and final-norm sites fold into their own
  parameters as in `SSF.apply`.

Other methods (RLRR, BitFit, linear probe, full fine-tuning) have no cheaper activation form;
`activation_form` raises and says to use `method.apply` (the weight form).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax_peft import paths, scan
from jax_peft.methods import layers
from jax_peft.methods import lowrank as lr
from jax_peft.methods.base import Method
from jax_peft.vit import ScaleShift, SidePath

Tree = Mapping[str, Any]
Side = dict[int, dict[str, SidePath | ScaleShift]]
_ATTN = ("q", "k", "v", "o")


def _fact_paths(method: Method, u: jax.Array, v: jax.Array,
               cores: Mapping[str, jax.Array]) -> dict[str, SidePath]:
    """FacT side paths of one block from U (D, r), V (r, D) and its cores: attention (r, r),
    fc1 T1 (r, k·r), fc2 T2 (k·r, r). Dropout on the core's output (factor index 1)."""
    opts = dict(scale=float(method.scale), dropout=float(method.dropout), dropout_after=1)
    # fc1 (U, T1, V): V acts on each of the k rank-r chunks of x U T1; fc2 (U, T2, V): U acts on each
    # of the k width-D chunks of h (SidePath's block-diagonal chunk rule, no kron(I_k, ·) built).
    cores = dict(cores)
    paths = {}
    if all(m in cores for m in ("q", "k", "v")):
        # q, k and v read the same x: one fused path x U [T_q | T_k | T_v] (r, 3r), then V on each
        # rank-r chunk, reads x once (and once more for dU) instead of three times. Dropout on the
        # (n, 3r) activation draws an independent mask per chunk, as the official per-path Dropout.
        paths["qkv"] = SidePath((u, jnp.concatenate([cores.pop(m) for m in ("q", "k", "v")], axis=1), v),
                                **opts)
    paths.update({m: SidePath((u, core, v), **opts) for m, core in cores.items()})
    return paths


def _check_depth(name: str, got: int, depth: int) -> None:
    if got != depth:
        raise ValueError(f"{name}: the adapter has {got} blocks but the model has {depth}; build the "
                         "adapter with method.init on this parameter tree")


def _fact_tt(method: Method, params: Tree, adapter: Tree, rng: jax.Array | None) -> tuple[Tree, Side]:
    _, k, depth = method._shapes(params)
    method._check_keys(adapter, ("U", "V") + method.modules)
    _check_depth(method.name, adapter[method.modules[0]].shape[0], depth)
    u, v = adapter["U"], adapter["V"]
    return params, {i: _fact_paths(method, u, v, {m: adapter[m][i] for m in method.modules})
                    for i in range(depth)}


def _fact_tk(method: Method, params: Tree, adapter: Tree, rng: jax.Array | None) -> tuple[Tree, Side]:
    """Cores as in `FacTTK.deltas`: slices A_ℓ = C ×₃ P_ℓ (r, r, c); attention j = A_ℓ[:, :, j];
    MLP F1 / T2 by the method's `mlp_layout`."""
    _, k, depth = method._shapes(params)
    method._check_keys(adapter, ("U", "V", "C", "P"))
    r, c = method.rank, method.columns(k)
    p = adapter["P"]
    if p.shape != (r, depth * c):
        raise ValueError(f"fact_tk: P has shape {p.shape}, expected {(r, depth * c)} for depth {depth}, "
                         f"rank {r}, blocks={method.blocks!r}; build the adapter for this model")
    slices = jnp.einsum("abc,cld->labd", adapter["C"], p.reshape(r, depth, c), precision=lr.HI)
    side = {}
    for i in range(depth):
        a, cores, off = slices[i], {}, 0
        if "q" in method.modules:
            cores.update({m: a[:, :, j] for j, m in enumerate(_ATTN)})
            off = 4
        if "fc1" in method.modules:
            mlp = a[:, :, off:off + 2 * k]
            if method.mlp_layout == "official":
                cores["fc1"] = mlp[:, :, :k].reshape(r, k * r)
                cores["fc2"] = mlp[:, :, k:].reshape(r, k * r).T
            else:
                cores["fc1"] = mlp[:, :, :k].transpose(0, 2, 1).reshape(r, k * r)
                cores["fc2"] = mlp[:, :, k:].transpose(2, 0, 1).reshape(k * r, r)
        side[i] = _fact_paths(method, adapter["U"], adapter["V"], cores)
    return params, side


def _efft(method: Method, params: Tree, adapter: Tree, rng: jax.Array | None) -> tuple[Tree, Side]:
    """`x K + s · x a b c` with the factors of `EFFT.factors(adapter, depth, rng)`: the same
    (dropped, when `rng` is given) factors `EFFT.apply(..., rng=rng)` multiplies out, so training
    with the same key draws identical masks. No activation dropout."""
    _, _, depth = method._shapes(params)
    fac = method.factors(adapter, depth, rng)
    return params, {i: {m: SidePath(tuple(f), scale=float(method.scale)) for m, f in fac[i].items()}
                    for i in range(depth)}


def _lora(method: Method, params: Tree, adapter: Tree, rng: jax.Array | None) -> tuple[Tree, Side]:
    """`x K + drop(x) A (s B)`. Separate pairs: the LoRA module's own `side_paths` (built from
    `increments`, the same (A, s·B) pairs as `apply`). Fused qkv: one "qkv" path per block with
    A (D, r) and s·B (r, 3D), so q, k and v share one input dropout mask as in NOAH's code."""
    depth = layers.num_blocks(params)
    if method.variant == "fused_qkv":
        side = {}
        for path, (a, b) in _lora_nodes(adapter).items():
            m = re.fullmatch(r"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_0/qkv", path)
            if m is None:
                raise ValueError(f"lora (fused_qkv): unexpected adapter node {path!r}; build the adapter with "
                                 "method.init for this variant")
            side[int(m.group(1))] = {"qkv": SidePath((a, b * method.scale), dropout=float(method.dropout),
                                                     dropout_after=-1)}
    else:
        side = method.side_paths(adapter)
    over = sorted(i for i in side if i >= depth)
    if over:
        raise ValueError(f"lora: the adapter has blocks {over} that a {depth}-block model does not have")
    return params, side


def _ssf(method: Method, params: Tree, adapter: Tree, rng: jax.Array | None) -> tuple[Tree, Side]:
    """SSF after the frozen linears as `ScaleShift`s on their outputs (γ, β get gradients from the
    outputs; no weight gradient is formed); the LayerNorm, patch-embedding and final-norm sites fold
    into their own affine / conv parameters exactly as `SSF.apply` does (a few vectors and one
    small conv kernel)."""
    depth = layers.num_blocks(params)
    side: Side = {}
    folded: dict[str, jax.Array] = {}
    for node, kind, i, module, scale, shift in method.site_leaves(adapter):
        if kind not in ("linear", "qkv"):
            folded.update({f"{node}/ssf_scale": scale, f"{node}/ssf_shift": shift})
            continue
        if i >= depth:
            raise ValueError(f"ssf: the adapter has block {i} that a {depth}-block model does not have")
        key = "qkv_ssf" if kind == "qkv" else f"{module}_ssf"
        side.setdefault(i, {})[key] = ScaleShift(scale, shift)
    return (method.apply(params, paths.unflatten(folded)) if folded else params), side


def _lora_nodes(adapter: Tree) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{node path: (lora_a, lora_b)} of a LoRA adapter tree."""
    nodes = paths.group_by_node(adapter)
    bad = {n: sorted(v) for n, v in nodes.items() if set(v) != {"lora_a", "lora_b"}}
    if bad:
        raise ValueError(f"lora adapter nodes need leaves lora_a and lora_b; got {bad}")
    return {n: (v["lora_a"], v["lora_b"]) for n, v in nodes.items()}


_BUILDERS: dict[str, Callable[[Method, Tree, Tree, Any], tuple[Tree, Side]]] = {
    "fact_tt": _fact_tt,
    "fact_tk": _fact_tk,
    "efft": _efft,
    "lora": _lora,
    "ssf": _ssf,
}


def supports_activation_form(method: Method) -> bool:
    """True for the methods with an activation form (FacT-TT/TK, EFFT, LoRA, SSF)."""
    return method.name in _BUILDERS


def activation_form(method: Method, params: Tree, adapter: Tree, *,
                    rng: jax.Array | None = None) -> tuple[Tree, Side]:
    """(params, side) for `ViT.apply(..., side=side)`: the frozen parameters (the low-rank methods
    change nothing else, so `params` itself is returned; SSF folds its LayerNorm, patch and
    final-norm sites into them) and one `SidePath` per adapted matrix,
    `{block: {"q"|"k"|"v"|"o"|"fc1"|"fc2"|"qkv": SidePath}}` ("qkv": LoRA's fused variant), or for
    SSF one `ScaleShift` per scaled linear output, `{block: {"qkv_ssf"|"o_ssf"|"fc1_ssf"|"fc2_ssf": ...}}`.

    `rng` is used only by methods whose training noise lives in the factors (EFFT); pass the same
    key as to `method.apply(..., rng=rng)` to draw the same masks. FacT and LoRA dropout is
    activation dropout drawn by the model from its "dropout" rng (`rngs={"dropout": key}`).
    """
    builder = _BUILDERS.get(method.name)
    if builder is None:
        raise ValueError(
            f"method {method.name!r} has no activation form (available for: {', '.join(_BUILDERS)}); "
            f"use the weight form, model.apply({{'params': method.apply(params, adapter)}}, ...)")
    if layers.num_blocks(params) == 0:
        raise ValueError("the parameter tree has no Transformer/encoderblock_{i}; nothing to adapt")
    return builder(method, params, adapter, rng)


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
