"""Sites: the adaptable layers of a backbone, described independently of its parameter tree.

A method never spells a backbone's parameter paths; it selects *sites* (by kind, block and regex) and
returns one edit per site (`jax_peft.methods.edits`). A backbone describes itself once:

    sites(params) -> {name: Site}       # e.g. "patch", "block3/q", "block3/qkv", "block3/ln1", "final_norm"

Every site is a linear map viewed as a matrix (d_in, d_out) with `y = x K + b`: the stored kernel is
reshaped to `(-1, d_out)` (ViT q/k/v kernels (D, H, hd) and out kernels (H, hd, D) give (D, D), the
patch convolution (P, P, 3, D) gives (P·P·3, D), a norm's scale (D,) gives (1, D): a norm is the
diagonal map y = n ⊙ scale + bias). A *composite* site (`parts`, no kernel of its own) is the
concatenation of its parts along the output axis, e.g. the ViT's fused `block3/qkv` = [q | k | v].
A *slice* site (`parent`, no kernel of its own) is the reverse: the output columns
[offset, offset + d_out) of another site, e.g. the Swin's `stage0/block1/q` inside its fused qkv
kernel; an edit on a slice changes only those columns.

Kinds: "q", "k", "v", "o" (attention output), "qkv" (fused or composite q|k|v), "fc1", "fc2" (MLP),
"patch" (patch embedding), "merge" (a patch-merging reduction), "norm" (LayerNorm affine).

A backbone registers a detector and a sites function with `register_backbone`; the ViT is built in.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from jax_peft import paths

Tree = Mapping[str, Any]
KINDS = ("q", "k", "v", "qkv", "o", "fc1", "fc2", "patch", "merge", "norm")


@dataclasses.dataclass(frozen=True)
class Site:
    """One adaptable layer.

    name: stable name ("block3/q", "stage2/block1/qkv", "patch", "final_norm").
    kind: one of `KINDS`.
    node: parameter node path that holds the layer's leaves (adapters mirror it: `{node}/{leaf}`);
      for a composite site a virtual path beside its parts (ViT: `.../MultiHeadDotProductAttention_0/qkv`).
    kernel, bias: leaf paths of the weight (a norm's `scale`) and the bias (None when absent or composite).
    d_in, d_out: the matrix view (d_in, d_out) (a norm: (D, D), viewed as the diagonal).
    block, stage: position in the backbone (None for stem/head-side sites such as "patch").
    parts: names of the sites a composite site concatenates along d_out.
    parent, offset: for a slice site, the site whose output columns [offset, offset + d_out) it is.
    hook: (block, key) of the backbone's activation-form hook for this site, or None.
    """

    name: str
    kind: str
    node: str
    kernel: str | None
    bias: str | None
    d_in: int
    d_out: int
    block: int | None = None
    stage: int | None = None
    parts: tuple[str, ...] = ()
    hook: tuple[int, str] | None = None
    parent: str | None = None
    offset: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_in, self.d_out)

    @property
    def local(self) -> str:
        """The last component of the name ("q", "ln1", "qkv", "patch")."""
        return self.name.rsplit("/", 1)[-1]


def matrix_view(kernel: Any, site: Site | str) -> Any:
    """The (·, d_out) matrix view of a site's stored weight (a plain reshape). `site` may also be a
    ViT module short name (q, k, v: output axes flattened; o, fc1, fc2: input axes flattened)."""
    if isinstance(site, str):
        return kernel.reshape(kernel.shape[0], -1) if site in ("q", "k", "v") else kernel.reshape(-1, kernel.shape[-1])
    return kernel.reshape(-1, site.d_out)


# --- backbones ----------------------------------------------------------------------------------
_BACKBONES: list[tuple[str, Callable[[Tree], bool], Callable[[Tree], list[Site]]]] = []


def register_backbone(name: str, detect: Callable[[Tree], bool], sites_fn: Callable[[Tree], list[Site]]) -> None:
    """Makes `sites(params)` recognise another backbone: `detect(params)` says whether a tree is one,
    `sites_fn(params)` lists its sites. Registering a name again replaces it."""
    _BACKBONES[:] = [b for b in _BACKBONES if b[0] != name]
    _BACKBONES.append((name, detect, sites_fn))


def backbone(params: Tree) -> str | None:
    """The registered name of the backbone a parameter tree is ("vit", "swin"), or None."""
    return next((name for name, detect, _ in _BACKBONES if detect(params)), None)


def adapter_backbone(adapter: Tree) -> str | None:
    """The backbone an adapter tree was built for, read from its paths (a Swin adapter's start with a
    stage, `layers_{i}/`; a ViT's with `embedding`, `Transformer` or its own names); None: the ViT's."""
    flat = paths.flatten(adapter) if isinstance(adapter, Mapping) else {}
    return "swin" if any(re.match(r"layers_\d+/", p) for p in flat) else None


def sites(params: Tree) -> dict[str, Site]:
    """{name: Site} of a parameter tree, in the backbone's order."""
    for _, detect, fn in _BACKBONES:
        if detect(params):
            return {s.name: s for s in fn(params)}
    known = ", ".join(b[0] for b in _BACKBONES)
    raise ValueError(f"the parameter tree is not a known backbone ({known}); it has top-level entries "
                     f"{sorted(params)[:8]}. Load it with jax_peft.load_checkpoint, or register its sites with "
                     "jax_peft.sites.register_backbone")


def select(all_sites: Mapping[str, Site], *, kinds: Iterable[str] | None = None,
           blocks: Iterable[int] | None = None, pattern: str | None = None, what: str = "selection") -> list[Site]:
    """Sites of the given kinds (None: any) in the given blocks (None: any, including sites outside
    blocks) whose name or node path matches `pattern` (re.search; None: all). Raises when a pattern
    matches nothing, naming a few sites that exist."""
    out = list(all_sites.values())
    if kinds is not None:
        kinds = set(kinds)
        out = [s for s in out if s.kind in kinds]
    if blocks is not None:
        blocks = set(blocks)
        out = [s for s in out if s.block in blocks]
    if pattern is not None:
        try:  # the .npz files' spellings of block children (MlpBlock_3, ...) are accepted too
            rxs = [re.compile(p) for p in dict.fromkeys((pattern, paths.tree_spelling(pattern)))]
        except re.error as e:
            raise ValueError(f"invalid regex {pattern!r} for {what}: {e}") from None
        hits = [s for s in out if any(rx.search(s.name) or rx.search(s.node)
                                      or any(rx.search(p) for p in (s.kernel, s.bias) if p) for rx in rxs)]
        if not hits:
            sample = ", ".join(f"{s.name} ({s.node})" for s in out[:4]) + (", ..." if len(out) > 4 else "")
            raise ValueError(f"{what} {pattern!r} selects no site. Sites look like: {sample}. Fix the regex "
                             "(matched with re.search against site names and parameter node paths).")
        out = hits
    return out


def num_blocks(params: Tree) -> int:
    """Number of blocks of a tree (the largest block index of its sites + 1; 0 without blocks)."""
    idx = [s.block for s in sites(params).values() if s.block is not None]
    return max(idx) + 1 if idx else 0


# --- the ViT ------------------------------------------------------------------------------------
# ViT naming (canonical Linen tree, see jax_peft.vit): short module name -> path inside a block.
MODULES: dict[str, str] = {
    "q": "MultiHeadDotProductAttention_0/query",
    "k": "MultiHeadDotProductAttention_0/key",
    "v": "MultiHeadDotProductAttention_0/value",
    "o": "MultiHeadDotProductAttention_0/out",
    "fc1": "MlpBlock_0/Dense_0",
    "fc2": "MlpBlock_0/Dense_1",
}
_BLOCK_RE = re.compile(r"encoderblock_(\d+)")


def block_path(i: int) -> str:
    return f"Transformer/encoderblock_{i}"


def module_path(i: int, module: str) -> str:
    """Node path of ViT block i's `module` (q, k, v, o, fc1, fc2)."""
    return f"{block_path(i)}/{MODULES[module]}"


def vit_depth_of(names: Iterable[str]) -> int:
    """1 + the largest ViT block index named in `names` (paths such as adapter node paths); 0 if none."""
    idx = [int(m.group(1)) for n in names if (m := re.search(r"(?:^|/)encoderblock_(\d+)(?:/|$)", n))]
    return max(idx) + 1 if idx else 0


def _is_vit(params: Tree) -> bool:
    tr = params.get("Transformer") if isinstance(params, Mapping) else None
    return isinstance(tr, Mapping) and any(_BLOCK_RE.fullmatch(k) for k in tr)


def _get(tree: Tree, path: str) -> Any:
    node: Any = tree
    for part in path.split("/"):
        node = node[part]
    return node


def vit_sites(params: Tree) -> list[Site]:
    """Sites of a canonical ViT tree: "patch"; per block i "block{i}/ln1", q, k, v, the composite
    "qkv" (= [q | k | v]), o, "ln2", fc1, fc2; and "final_norm"."""
    tr = params["Transformer"]
    depth = len([k for k in tr if _BLOCK_RE.fullmatch(k)])
    emb = np.shape(_get(params, "embedding/kernel"))
    out = [Site("patch", "patch", "embedding", "embedding/kernel", "embedding/bias",
                int(np.prod(emb[:-1])), int(emb[-1]))]
    for i in range(depth):
        b = block_path(i)

        def norm(local: str, name: str) -> Site:
            d = int(np.shape(_get(params, f"{b}/{name}/scale"))[-1])
            return Site(f"block{i}/{local}", "norm", f"{b}/{name}", f"{b}/{name}/scale", f"{b}/{name}/bias", d, d,
                        block=i)

        def linear(m: str, hook: bool = True) -> Site:
            node = f"{b}/{MODULES[m]}"
            shape = np.shape(_get(params, f"{node}/kernel"))
            d_in, d_out = (int(shape[0]), int(np.prod(shape[1:]))) if m in ("q", "k", "v") else \
                (int(np.prod(shape[:-1])), int(shape[-1]))
            return Site(f"block{i}/{m}", m, node, f"{node}/kernel", f"{node}/bias", d_in, d_out, block=i,
                        hook=(i, m))

        q, k, v = linear("q"), linear("k"), linear("v")
        qkv = Site(f"block{i}/qkv", "qkv", f"{b}/MultiHeadDotProductAttention_0/qkv", None, None, q.d_in,
                   q.d_out + k.d_out + v.d_out, block=i, parts=(q.name, k.name, v.name), hook=(i, "qkv"))
        out += [norm("ln1", "LayerNorm_0"), q, k, v, qkv, linear("o"), norm("ln2", "LayerNorm_1"),
                linear("fc1"), linear("fc2")]
    d = int(np.shape(_get(params, "Transformer/encoder_norm/scale"))[-1])
    out.append(Site("final_norm", "norm", "Transformer/encoder_norm", "Transformer/encoder_norm/scale",
                    "Transformer/encoder_norm/bias", d, d))
    return out


register_backbone("vit", _is_vit, vit_sites)


# --- the Swin Transformer (jax_peft.swin describes its sites) -----------------------------------
def _is_swin(params: Tree) -> bool:
    return isinstance(params, Mapping) and "patch_embed" in params and "layers_0" in params


def _swin_sites(params: Tree) -> list[Site]:
    from jax_peft.swin import swin_sites

    return swin_sites(params)


register_backbone("swin", _is_swin, _swin_sites)
