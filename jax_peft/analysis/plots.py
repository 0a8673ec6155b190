"""PNG figures for the spectral lens (matplotlib is an optional extra: `pip install jax-peft[plot]`).

    plots.heatmap(spectra, "delta_fro.png")                 # blocks × modules, ‖ΔW‖_F
    plots.spectrum(spectra, "q", 0, "spectrum_q0.png")       # σ(W), σ(W') and relative change
    plots.similarity_grid(grid, i_values, j_values, "phi.png")

Every function writes one PNG (Agg backend, no display needed) and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# value name -> (colorbar label, title)
HEATMAP_VALUES = {
    "delta_fro": ("‖ΔW‖_F", "Frobenius norm of the increment"),
    "delta_rel": ("‖ΔW‖_F / ‖W‖_F", "relative size of the increment"),
    "delta_erank": ("effective rank", "effective rank of ΔW (Roy & Vetterli)"),
    "delta_rank": ("numerical rank", "numerical rank of ΔW"),
    "overlap_left": ("mean cos²", "top-k input subspace overlap of W and W'"),
    "overlap_right": ("mean cos²", "top-k output subspace overlap of W and W'"),
    "max_abs_rel_change": ("max |Δσ/σ|", "largest relative change of a singular value"),
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib, an optional extra: pip install 'jax-peft[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def heatmap_values(spectra: Mapping[str, Any], value: str = "delta_fro") -> tuple[np.ndarray, list[str], list[int]]:
    """(blocks × modules array, module names, block indices) of one per-block statistic."""
    if value not in HEATMAP_VALUES:
        raise ValueError(f"unknown value {value!r}; choose from {', '.join(HEATMAP_VALUES)}")
    modules = list(spectra)
    if not modules:
        raise ValueError("no modules in `spectra`")
    blocks = list(next(iter(spectra.values())).blocks)
    grid = np.array([[row[value] for row in spectra[m].rows()] for m in modules], dtype=float).T
    return grid, modules, blocks


def heatmap(spectra: Mapping[str, Any], path: str | os.PathLike, *, value: str = "delta_fro",
            title: str | None = None) -> str:
    """Blocks (rows) × modules (columns) heatmap of a per-block statistic of `spectral_lens`."""
    plt = _pyplot()
    grid, modules, blocks = heatmap_values(spectra, value)
    label, default_title = HEATMAP_VALUES[value]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(modules), 1.2 + 0.35 * len(blocks)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), modules)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("module")
    ax.set_ylabel("block")
    ax.set_title(title or default_title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    return _save(fig, path)


def spectrum(spectra: Mapping[str, Any], module: str, block: int, path: str | os.PathLike, *,
             title: str | None = None) -> str:
    """σ_i(W) and σ_i(W') (log scale), σ_i(ΔW), and the relative change of each σ_i."""
    plt = _pyplot()
    if module not in spectra:
        raise ValueError(f"module {module!r} not in spectra (have {list(spectra)})")
    sp = spectra[module]
    if block not in sp.blocks:
        raise ValueError(f"block {block} not in spectra (have {list(sp.blocks)})")
    b = list(sp.blocks).index(block)
    s, s2, sd, rel = sp.s_base[b], sp.s_adapted[b], sp.delta_s[b], sp.rel_change[b]
    idx = np.arange(1, len(s) + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.semilogy(idx, s, label="σ(W)")
    a1.semilogy(idx, s2, "--", label="σ(W')")
    a1.semilogy(idx, np.maximum(sd, 1e-12), ":", label="σ(ΔW)")
    a1.set_xlabel("index i")
    a1.set_ylabel("singular value")
    a1.legend(fontsize=8)
    a2.plot(idx, rel)
    a2.axhline(0.0, color="gray", lw=0.5)
    a2.set_xlabel("index i")
    a2.set_ylabel("(σ_i(W') − σ_i(W)) / σ_i(W)")
    fig.suptitle(title or f"block {block}, {module}: spectra before and after", fontsize=10)
    return _save(fig, path)


def similarity_grid(grid: np.ndarray, i_values: Sequence[int], j_values: Sequence[int],
                    path: str | os.PathLike, *, title: str = "φ(A, B, i, j)",
                    labels: tuple[str, str] = ("i (A)", "j (B)")) -> str:
    """A φ grid (len(i), len(j)) as an annotated heatmap in [0, 1] (NaN cells blank)."""
    plt = _pyplot()
    grid = np.asarray(grid, dtype=float)
    if grid.shape != (len(i_values), len(j_values)):
        raise ValueError(f"grid shape {grid.shape} does not match ({len(i_values)}, {len(j_values)})")
    fig, ax = plt.subplots(figsize=(1.5 + 0.55 * len(j_values), 1.2 + 0.5 * len(i_values)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    ax.set_xticks(range(len(j_values)), [str(j) for j in j_values])
    ax.set_yticks(range(len(i_values)), [str(i) for i in i_values])
    ax.set_xlabel(labels[1])
    ax.set_ylabel(labels[0])
    if grid.size <= 144:
        for (r, c), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)
