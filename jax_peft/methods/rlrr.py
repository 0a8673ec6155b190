"""RLRR (Dong et al., CVPR 2024): residual low-rank rescaling of every linear layer plus SSF.

For each selected linear (q, k, v, o, fc1, fc2 of a block; q/k/v separate), with kernel K (in, out):

    K' = K ⊙ (1 + s_in s_outᵀ)        s_in (in,), s_out (out,)      (paper: W + s_left ⊙ W ⊙ s_rightᵀ)
    b' = b + f                        f (out,)

and SSF `y = x ⊙ γ + β` after LayerNorm_0 and LayerNorm_1 of every selected block, after the final
encoder norm and on the patch-embedding output (before CLS / position embedding). Everything folds
into the weights exactly (LN-SSF into the LN affine, patch SSF into the conv, see `rescale`), so
`apply` is the merge.

Adapter paths (readable, mirroring the parameter tree)::

    embedding/{ssf_scale, ssf_shift}                                               (D,)
    Transformer/encoderblock_{i}/LayerNorm_{0,1}/{ssf_scale, ssf_shift}            (D,)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value,out}/{s_in, s_out, f}
    Transformer/encoderblock_{i}/MlpBlock_0/{Dense_0, Dense_1}/{s_in, s_out, f}
    Transformer/encoder_norm/{ssf_scale, ssf_shift}                                (D,)

Official names (zstarN70/RLRR `models/networks.py`): see `official_name`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft import sites as sites_lib
from jax_peft.methods import rescale
from jax_peft.methods.base import BackboneVariants, Method, Tree, check_placements, select_blocks
from jax_peft.methods.edits import OutputAffine, Rescale
from jax_peft.methods.simple import path_mask
from jax_peft.sites import Site

LINEAR = ("q", "k", "v", "o", "fc1", "fc2")
_OFFICIAL_MODULE = {"q": "attn.query", "k": "attn.key", "v": "attn.value", "o": "attn.out",
                    "fc1": "ffn.fc1", "fc2": "ffn.fc2"}
_LN_OFFICIAL = {"ln1": "attn_norm", "ln2": "ffn_norm"}
_RESCALE_LEAVES = ("s_in", "s_out", "f")
_SSF_LEAVES = ("ssf_scale", "ssf_shift")


def _leaves(site: Site) -> tuple[str, ...]:
    return _RESCALE_LEAVES if site.kind in LINEAR else _SSF_LEAVES


def official_name(site: Site, leaf: str) -> str:
    """Official PyTorch parameter name of one adapter leaf."""
    if site.kind in LINEAR:
        off = {"s_in": "scale_col", "s_out": "scale_line", "f": "shift_bias"}[leaf]
        return f"transformer.encoder.layer.{site.block}.{_OFFICIAL_MODULE[site.kind]}.{off}"
    kind = leaf.split("_")[1]  # scale | shift
    if site.kind == "patch":
        return f"transformer.embeddings.ssf_{kind}_patch"
    if site.block is None:
        return f"transformer.encoder.ssf_{kind}_enc_norm"
    return f"transformer.encoder.layer.{site.block}.ssf_{kind}_{_LN_OFFICIAL[site.local]}"


def _official_shape(leaf: str, n: int) -> tuple[int, ...]:
    return {"s_in": (1, n), "s_out": (n, 1), "f": (1, n)}.get(leaf, (n,))


def init_leaves(rng: jax.Array, chosen: list[Site], identity: bool, rescaled: tuple[str, ...]) -> dict:
    """RLRR's adapter over `chosen` sites: (s_in, s_out, f) on sites of a kind in `rescaled`, SSF
    (ssf_scale, ssf_shift) on the others; official or identity init (see `RLRR`)."""
    flat: dict[str, Any] = {}
    for key, s in zip(jax.random.split(rng, len(chosen)), chosen):
        if s.kind in rescaled:
            k1, k2 = jax.random.split(key)
            flat[f"{s.node}/s_in"] = rescale.kaiming_uniform(k1, (s.d_in,), s.d_in)
            flat[f"{s.node}/s_out"] = (jnp.zeros((s.d_out,), jnp.float32) if identity
                                       else rescale.kaiming_uniform(k2, (s.d_out,), 1))
            flat[f"{s.node}/f"] = jnp.zeros((s.d_out,), jnp.float32)
        else:
            ssf = rescale.ssf_init(key, s.d_out, identity)
            flat[f"{s.node}/ssf_scale"], flat[f"{s.node}/ssf_shift"] = ssf["scale"], ssf["shift"]
    return paths.unflatten(flat)


def _abstract_vit(sd: Mapping[str, Any], depth: int) -> dict:
    """A shape-only ViT tree of `depth` blocks with the widths an official RLRR state dict implies
    (for `from_official` without params: only site names and the official names matter)."""
    def size(name: str, default: int) -> int:
        return int(np.size(sd[name])) if name in sd else default

    d = size("transformer.embeddings.ssf_scale_patch", size("transformer.encoder.layer.0.attn.query.scale_col", 768))
    m = size("transformer.encoder.layer.0.ffn.fc1.scale_line", 4 * d)
    return _vit_shapes(d, m, depth)


@functools.lru_cache(maxsize=8)
def _vit_shapes(d: int, m: int, depth: int) -> dict:
    from jax_peft import vit

    return vit.param_shapes(vit.ViTConfig(patch_size=1, image_size=1, hidden_size=d, mlp_dim=m, num_layers=depth,
                                          num_heads=1, num_classes=1))


@dataclasses.dataclass(frozen=True)
class RLRR(BackboneVariants, Method):
    """RLRR with the official placements by default.

    Hyper-parameters:
      init_scheme (option name `init`): "official" (shipped kaiming-uniform scales, so the model does
        NOT start at the pretrained function: s_in ~ U(±√(6/in)), s_out ~ U(±√6), f = 0,
        SSF γ ~ N(1, .02²), β ~ N(0, .02²)) or "identity" (s_in as official, s_out = 0, f = 0,
        γ = 1, β = 0: exactly the pretrained model at step 0).
      modules: linears to rescale, subset of ("q", "k", "v", "o", "fc1", "fc2"); () for SSF only.
      ln_ssf, patch_ssf, final_ssf: SSF after LN_0/LN_1 of each selected block, on the patch
        embedding, after the final norm.
      layers: blocks to adapt (None = all), e.g. range(6, 12).
      targets: optional regex (re.search) over the node paths of the candidate sites (e.g.
        "MlpBlock_0" for FFN only, "LayerNorm" for LN-SSF only); must select something.
    """

    name: ClassVar[str] = "rlrr"
    head_init: ClassVar[str] = "zeros"
    hparam_aliases: ClassVar[Mapping[str, str]] = {"init": "init_scheme"}
    edit_kinds: ClassVar[tuple[type, ...]] = (Rescale, OutputAffine)
    variants: ClassVar[Mapping[str, str]] = {"swin": "rlrr_swin"}  # the official Swin code (fused qkv)

    init_scheme: str = "official"
    modules: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2")
    ln_ssf: bool = True
    patch_ssf: bool = True
    final_ssf: bool = True
    layers: tuple[int, ...] | None = None
    targets: str | None = None

    def __post_init__(self):
        check_placements(self, "modules", LINEAR, "module")

    # --- selection --------------------------------------------------------------------------
    def select(self, params: Tree) -> list[Site]:
        """Adapted sites in init order: patch; per block its norms then its linears; final norm
        (raises when nothing is selected)."""
        if sites_lib._is_swin(params):
            raise ValueError("rlrr: RLRR.select lists the ViT placements; on a Swin Transformer rlrr runs its "
                             "official Swin variant: use method.on(params).select(params)")
        all_sites = sites_lib.sites(params)
        blocks = set(select_blocks(all_sites, self.layers, self.name))
        chosen = []
        for s in all_sites.values():
            if s.kind == "patch":
                keep = self.patch_ssf
            elif s.block is None:
                keep = self.final_ssf and s.kind == "norm"
            else:
                keep = s.block in blocks and ((s.kind == "norm" and self.ln_ssf) or s.kind in self.modules)
            if keep:
                chosen.append(s)
        chosen.sort(key=lambda s: (-1 if s.kind == "patch" else (1 << 30) if s.block is None else s.block,
                                   s.kind != "norm"))
        if self.targets is not None and chosen:
            keep_names = {s.name for s in sites_lib.select({s.name: s for s in chosen}, pattern=self.targets,
                                                           what="rlrr target")}
            chosen = [s for s in chosen if s.name in keep_names]
        if not chosen:
            raise ValueError("rlrr: the selection adapts nothing; enable some modules, ln_ssf, "
                             "patch_ssf or final_ssf")
        return chosen

    # --- contract ---------------------------------------------------------------------------
    def init(self, rng: jax.Array, params: Tree) -> dict:
        return init_leaves(rng, self.select(params), self.init_scheme == "identity", LINEAR)

    def _grouped(self, params: Tree, adapter: Tree) -> list[tuple[Site, dict[str, Any]]]:
        by_node = {s.node: s for s in self.select(params)}
        out = []
        for node, leaves in paths.group_by_node(adapter).items():
            if node not in by_node:
                raise ValueError(f"rlrr: the adapter has a location {node!r} that these options and parameters do "
                                 "not adapt; build the adapter with method.init for this model")
            out.append((by_node[node], leaves))
        return out

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, Any]:
        """Rescale (s_in, s_out, f) on each selected linear; OutputAffine (γ, β) on the norms and
        the patch embedding (folded into their affine / conv parameters)."""
        return {s.name: Rescale(lv["s_in"], lv["s_out"], lv["f"]) if s.kind in LINEAR
                else OutputAffine(lv["ssf_scale"], lv["ssf_shift"]) for s, lv in self._grouped(params, adapter)}

    def decay_mask(self, trainable: Tree) -> Any:
        """Official rule: no decay on names containing `bias` or `norm`, i.e. the shifts f, the
        LN-SSF γ/β (LN1, LN2, final) and the head bias; s_in, s_out, patch SSF, head kernel decay."""

        def decay(path: str, _: Any) -> bool:
            if path.startswith("head/"):
                return path.endswith("kernel")
            node_path, leaf = path.removeprefix("adapter/").rsplit("/", 1)
            # the official names of norm SSF leaves contain "norm", as do the norm nodes of the tree
            return leaf != "f" and not (leaf.startswith("ssf_") and "norm" in node_path.lower())

        return path_mask(trainable, decay)

    def summary(self) -> str:
        blocks = "all blocks" if self.layers is None else f"blocks {list(self.layers)}"
        parts = []
        if self.modules:
            parts.append(f"row/column rescale K ⊙ (1 + s_in s_outᵀ) and bias shift of "
                         f"{', '.join(self.modules)} ({blocks}; in + 2·out each)")
        if self.ln_ssf:
            parts.append(f"SSF after LN1 and LN2 ({blocks}; 2D each)")
        if self.patch_ssf:
            parts.append("SSF on the patch embedding (2D)")
        if self.final_ssf:
            parts.append("SSF after the final norm (2D)")
        t = f"; restricted to paths matching {self.targets!r}" if self.targets else ""
        return (f"rlrr (init={self.init_scheme}): " + "; ".join(parts) + t
                + ". Full default count L(19D + 3M) + 4D (ViT-B/16: 288,768). Folds exactly into the weights.")

    # --- official layout --------------------------------------------------------------------
    def from_official(self, state_dict: Mapping[str, Any], params: Tree | None = None) -> dict:
        """Adapter from an official RLRR state dict (numpy arrays). `params` fixes the depth and
        the expected shapes; without it the depth is read from the names. Backbone and head
        tensors are ignored; missing, mis-shaped or unknown RLRR tensors raise one error."""
        sd = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
        given = params is not None
        if not given:
            idx = [int(m.group(1)) for k in sd if (m := re.match(r"transformer\.encoder\.layer\.(\d+)\.", k))]
            params = _abstract_vit(sd, max(idx) + 1 if idx else 0)
        expected: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        for s in self.select(params):
            for leaf in _leaves(s):
                shape = _official_shape(leaf, s.d_in if leaf == "s_in" else s.d_out) if given else None
                expected[official_name(s, leaf)] = (f"{s.node}/{leaf}", shape)
        problems, flat = [], {}
        for name, (path, shape) in expected.items():
            if name not in sd:
                problems.append(f"missing {name}")
                continue
            arr = np.asarray(sd[name])
            leaf = path.rsplit("/", 1)[1]
            ok_rank = arr.ndim == len(_official_shape(leaf, 1)) and (
                leaf not in ("s_in", "f") or arr.shape[0] == 1) and (leaf != "s_out" or arr.shape[-1] == 1)
            if (shape is not None and arr.shape != shape) or not ok_rank:
                want = shape or _official_shape(leaf, -1)
                problems.append(f"{name} has shape {arr.shape}, expected {want}")
                continue
            flat[path] = jnp.asarray(arr.reshape(-1), jax.dtypes.canonicalize_dtype(np.float64))  # f32 unless x64
        rlrr_like = re.compile(r"(scale_col|scale_line|shift_bias|ssf_scale|ssf_shift)")
        unknown = sorted(k for k in sd if rlrr_like.search(k) and k not in expected)
        problems += [f"unexpected {k}" for k in unknown]
        if problems:
            raise ValueError(
                f"rlrr: the state dict does not match this RLRR configuration ({len(problems)} problem(s)): "
                + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else "")
                + ". Check the depth/width of params and the method options (modules, layers, *_ssf).")
        return paths.unflatten(flat)

    def to_official(self, tree: Tree) -> dict[str, np.ndarray]:
        """Flat {official name: array} in the official layouts (scale_col (1, in), scale_line
        (out, 1), shift_bias (1, out), SSF (D,)). Works on adapters and their gradients; a tree
        {"adapter": ..., "head": ...} also maps the head to `head.weight` (C, D) / `head.bias`."""
        out: dict[str, np.ndarray] = {}
        adapter = tree
        if set(tree) == {"adapter", "head"}:
            adapter = tree["adapter"]
            out["head.weight"] = np.asarray(tree["head"]["kernel"]).T
            out["head.bias"] = np.asarray(tree["head"]["bias"])
        for node, leaves in paths.group_by_node(adapter).items():
            site = self._site_of_node(node)
            if set(leaves) != set(_leaves(site)):
                raise ValueError(f"rlrr adapter at {node!r} has leaves {sorted(leaves)}, expected {sorted(_leaves(site))}")
            for leaf, v in leaves.items():
                v = np.asarray(v)
                out[official_name(site, leaf)] = v.reshape(_official_shape(leaf, v.size))
        return out

    def _site_of_node(self, node: str) -> Site:
        """The ViT site of an adapter node (to_official has no params: the official layout is the ViT's)."""
        by_node = {s.node: s for s in sites_lib.vit_sites(_abstract_vit({}, sites_lib.vit_depth_of([node]) or 1))}
        if node not in by_node:
            raise ValueError(f"{node!r} is not an RLRR adapter location of a ViT")
        return by_node[node]


