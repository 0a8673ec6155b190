"""Research tools: the spectral lens, subspace similarity, adapter arithmetic and swapping.

    from jax_peft import analysis
    spectra = analysis.spectral_lens(params, method, adapter)      # {module: ModuleSpectra}
    grid = analysis.phi_grid(delta_a, delta_b, [1, 2, 4, 8], [1, 2, 4, 8])
    bank = analysis.AdapterBank(params).add("dtd", method, adapter, head=head)
    fwd = analysis.SwappableForward(model, method)                # adapter is a jit argument

Plots (`analysis.plots`) need matplotlib (`pip install jax-peft[plot]`); `python -m jax_peft.analysis`
writes a report for a trained run.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "spectral_lens": "spectral", "compare": "spectral", "matrix_spectra": "spectral",
    "ModuleSpectra": "spectral", "effective_rank": "spectral", "relative_change": "spectral",
    "module_matrices": "spectral", "leaf_changes": "spectral", "table": "spectral",
    "rounding_floor": "spectral",
    "phi": "similarity", "phi_grid": "similarity", "basis_phi_grid": "similarity",
    "principal_angles": "similarity", "top_subspace_angles": "similarity",
    "numerical_rank": "similarity", "singular_vectors": "similarity",
    "adapter_similarity": "similarity",
    "AdapterBank": "arithmetic", "task_vector": "arithmetic", "combine_deltas": "arithmetic",
    "combine_adapters": "arithmetic", "apply_delta": "arithmetic", "identity_adapter": "arithmetic",
    "Entry": "arithmetic", "AFFINE_METHODS": "arithmetic",
    "SwappableForward": "swap", "make_forward": "swap",
    "report": "__main__", "report_trees": "__main__", "load_run": "__main__",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f"jax_peft.analysis.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name in ("plots", "spectral", "similarity", "arithmetic", "swap"):
        return import_module(f"jax_peft.analysis.{name}")
    raise AttributeError(f"module 'jax_peft.analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
