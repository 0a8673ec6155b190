"""The contract every PEFT method implements, and the registry behind `jax_peft.get_method`.

A method is a frozen dataclass of hyper-parameters with pure functions over pytrees:

    adapter = method.init(rng, params)          # the method's own trainable leaves (nested dict)
    edits   = method.edits(params, adapter)     # {site name | leaf path: Edit} (jax_peft.methods.edits)
    eff     = method.apply(params, adapter)     # effective params, same tree structure as params
    n       = method.num_params(adapter)        # trainable count, head excluded

A method implements `init` and `edits` only: the weight form (`apply`), `merge`, the activation form
(`jax_peft.methods.activation`), adapter arithmetic and the spectral lens are derived from the edits
by generic code. Its traits live on the class: `edit_kinds` (from which `has_activation_form()` and
`affine_in_leaves()` follow), `head_init`, `decay_mask` and, when it has one, the official layout
(`from_official` / `to_official`). A new method registers with `register_method("name")` (or by
subclassing `Method` with a class attribute `name`) and then works with `get_method`, training,
merge and the analysis tools.

The trainable set during fine-tuning is `{"adapter": adapter, "head": params["head"]}`; methods that
train base leaves directly (BitFit, full fine-tuning) keep copies of those leaves in the adapter and
`apply` writes them back, so every method trains through the same interface.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft.methods import edits as edits_lib

Tree = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class. Subclasses are frozen dataclasses whose fields are the hyper-parameters."""

    name: ClassVar[str] = "base"
    # Initialization of the classification head when a method starts from a new head
    # ("zeros": vit_jax/RLRR; "torch_linear": PyTorch nn.Linear default, FacT/EFFT;
    #  "trunc_normal": timm, SSF).
    head_init: ClassVar[str] = "zeros"
    # Option names accepted by `get_method` that differ from the field name, because a field
    # cannot be called `init` (it would shadow `Method.init`): e.g. {"init": "init_scheme"}.
    hparam_aliases: ClassVar[Mapping[str, str]] = {}
    # The edit kinds `edits` returns (jax_peft.methods.edits); traits below are derived from them.
    edit_kinds: ClassVar[tuple[type, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if isinstance(name, str) and not name.startswith("_") and name not in _REGISTRY:
            _CLASSES[name] = cls  # subclassing with a name registers the method

    # --- to implement -------------------------------------------------------------------------
    def init(self, rng: jax.Array, params: Tree) -> dict:
        raise NotImplementedError

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, Any]:
        """{site name: LowRank | OutputAffine | Rescale, or leaf path: Replace} (see
        `jax_peft.methods.edits`). `rng` (optional) enables training-time noise that lives in the
        weights (EFFT's factor dropout); methods without such noise ignore it."""
        raise NotImplementedError

    def summary(self) -> str:
        """One paragraph: what is adapted and how."""
        return f"{self.name}: {self.hparams()}"

    # --- derived ------------------------------------------------------------------------------
    def apply(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict:
        """Effective parameters (the weight form): `params` with the method's edits folded in, in
        each parameter's own dtype. The adapter is checked against `params` first (`check_adapter`)."""
        check_adapter(self, params, adapter)
        return edits_lib.apply_edits(params, self.edits(params, adapter, rng=rng))

    @classmethod
    def has_activation_form(cls) -> bool:
        """Whether every edit kind of the method can run beside the frozen layers (low-rank branches,
        output scale/shift): then training can use the activation form."""
        return bool(cls.edit_kinds) and all(k.activation for k in cls.edit_kinds)

    @classmethod
    def affine_in_leaves(cls) -> bool:
        """Whether `apply` is affine in the adapter leaves (leaf-space adapter arithmetic is exact)."""
        return not cls.not_affine_because()

    @classmethod
    def not_affine_because(cls) -> str:
        """Why `apply` is not affine in the leaves ("" when it is)."""
        return "; ".join(dict.fromkeys(k.affine for k in cls.edit_kinds if k.affine))

    @classmethod
    def has_official_layout(cls) -> bool:
        """Whether the method imports / exports the official PyTorch state dicts."""
        return cls.from_official is not Method.from_official

    def from_official(self, state_dict: Mapping[str, Any], params: Tree | None = None) -> dict:
        raise ValueError(f"no official layout for method {self.name!r}")

    def to_official(self, tree: Tree) -> dict:
        raise ValueError(f"no official layout for method {self.name!r}")

    def adapter_hint(self) -> str:
        """A sentence on what the adapter's shapes depend on (appended to adapter mismatch errors)."""
        return ""

    # --- shared behaviour ---------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self, params: Tree | None = None) -> dict[str, Any]:
        """{"method": name, "hparams": {...}} with JSON types (tuples as lists): what an adapter was
        built with; with `params`, also "model": the backbone's block count and site shapes (which
        tell a patch-8 model from a patch-4 one even where the adapter's shapes agree). Store it
        beside an adapter; `check_spec` (and `jax_peft.merge(..., spec=)`) refuses a mismatch."""
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        out = {"method": self.name, "hparams": {k: plain(v) for k, v in self.hparams().items()}}
        if params is not None:
            out["model"] = _model_signature(params)
        return out

    def check_spec(self, spec: Mapping[str, Any], params: Tree | None = None) -> None:
        """Raises one `SpecMismatchError` when `spec` (from `Method.spec`) names another method,
        other hyper-parameters or (with `params` and a recorded "model") another model; the error
        lists each differing field with its stored and requested value."""
        mine = self.spec(params if "model" in spec else None)
        if spec.get("method") != mine["method"]:
            raise SpecMismatchError(self.name, {"method": (spec.get("method"), self.name)}, spec)
        theirs = dict(spec.get("hparams", {}))
        fields = {k: (theirs[k], v) for k, v in mine["hparams"].items() if k in theirs and theirs[k] != v}
        fields.update({k: (theirs[k], "(unknown option)") for k in theirs if k not in mine["hparams"]})
        if "model" in mine:
            a, b = spec["model"], mine["model"]
            fields.update({f"model {k}": (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)})
        if fields:
            raise SpecMismatchError(self.name, fields, spec)

    def num_params(self, adapter: Tree) -> int:
        """Trainable parameters of the adapter (the head is not counted)."""
        return paths.count(adapter)

    def trainable_mask(self, params: Tree) -> dict:
        """Bool tree over `params`: leaves trained directly (the head, plus base leaves the method
        copies into its adapter, e.g. BitFit's biases). Everything else is frozen."""
        return paths.mask(params, lambda p: p.startswith("head/"))

    def decay_mask(self, trainable: Tree) -> dict:
        """Bool tree over `{"adapter": ..., "head": ...}`: which leaves get weight decay.
        Default: every trainable leaf (FacT / EFFT official recipes)."""
        return jax.tree_util.tree_map(lambda _: True, trainable)

    def init_head(self, rng: jax.Array, width: int, num_classes: int) -> dict:
        """A fresh head {"kernel": (D, C), "bias": (C,)} with this method's official init."""
        return init_head(rng, width, num_classes, self.head_init)

    def __str__(self) -> str:
        return self.summary()


class SpecMismatchError(ValueError):
    """An adapter recorded (`Method.spec`) with another method, other hyper-parameters or another
    model than it is used with. `fields`: {field: (stored, requested)}; `spec`: the stored spec.
    `where` (e.g. the checkpoint) prefixes the message; `fix` replaces the default way out."""

    def __init__(self, method: str, fields: Mapping[str, tuple[Any, Any]], spec: Mapping[str, Any], *,
                 where: str = "", fix: str = ""):
        self.method, self.fields, self.spec = method, dict(fields), dict(spec)
        diff = "; ".join(f"{k}: stored {v[0]!r}, requested {v[1]!r}" for k, v in self.fields.items())
        if not fix and "method" in self.fields:
            fix = f"use get_method({spec.get('method')!r}, **spec['hparams'])"
        elif not fix:
            fix = "use the method it was built for, get_method(spec['method'], **spec['hparams'])"
            fix += ", on the model it was built for" if any(k.startswith("model ") for k in self.fields) else ""
        super().__init__(f"{where + ': ' if where else ''}{method}: the adapter was built with other settings "
                         f"({diff}); {fix}")


_DISPATCHED = ("init", "edits", "apply", "from_official", "to_official")


def _dispatching(name: str, own: Any) -> Any:
    """`own` (a method's function `name`) run by the variant for the backbone of its tree argument."""
    @functools.wraps(own)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "to_official":
            v = self._for_adapter(args[0] if args else kwargs["tree"])
        else:
            tree = args[1] if name in ("init", "from_official") and len(args) > 1 else \
                (args[0] if name in ("edits", "apply") else kwargs.get("params"))
            v = self if tree is None else self.on(tree)
        return own(self, *args, **kwargs) if v is self else getattr(v, name)(*args, **kwargs)

    run._dispatch = True  # type: ignore[attr-defined]
    return run


class BackboneVariants:
    """Mixin (listed before `Method`) for a method with variants on other backbones, e.g. RLRR's
    official Swin code: `variants = {"swin": "rlrr_swin"}` maps a backbone name (`jax_peft.sites.
    backbone`) to a registered method. `init`, `edits`, `apply`, `from_official` and `to_official`
    (also those a subclass defines) then run that variant on a tree of that backbone, so one name
    serves every backbone.

    The variant is built with the options this method sets away from its defaults (the others take
    the variant's defaults: each backbone's official settings); an option the variant lacks raises."""

    variants: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _DISPATCHED:
            own = cls.__dict__.get(name)
            if own is not None and not getattr(own, "_dispatch", False):
                setattr(cls, name, _dispatching(name, own))

    def on(self, params: Tree) -> Method:
        """The method that runs on `params`: this one, or its variant for `params`' backbone."""
        from jax_peft import sites as sites_lib

        return self._variant(sites_lib.backbone(params))

    def _variant(self, backbone: str | None) -> Any:
        target = self.variants.get(backbone)
        if target is None:
            return self
        cls = method_class(target)
        mine = {f.name: f.default for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        theirs = {f.name for f in dataclasses.fields(cls)}
        changed = {k: getattr(self, k) for k, d in mine.items() if getattr(self, k) != d}
        lacking = sorted(k for k in changed if k not in theirs)
        if lacking:
            raise ValueError(f"{getattr(self, 'name', '?')} on a {backbone} backbone runs its {backbone} variant "
                             f"{target!r}, which has no option(s) {lacking} (set here to "
                             f"{[changed[k] for k in lacking]}); drop them, or use the variant's options "
                             f"({', '.join(sorted(theirs))})")
        return cls(**{k: v for k, v in changed.items() if k in theirs})

    def _for_adapter(self, tree: Tree) -> Any:
        from jax_peft import sites as sites_lib

        adapter = tree["adapter"] if set(tree) == {"adapter", "head"} else tree
        return self._variant(sites_lib.adapter_backbone(adapter))


def _method_apply(self: Any, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict:
    return Method.apply(self, params, adapter, rng=rng)


BackboneVariants.apply = _dispatching("apply", _method_apply)  # type: ignore[attr-defined]


def _model_signature(params: Tree) -> dict[str, Any]:
    """{"blocks": L, "<kind>": [[d_in, d_out], ...]}: the distinct site shapes per kind."""
    from jax_peft import sites as sites_lib

    all_sites = sites_lib.sites(params).values()
    out: dict[str, Any] = {"blocks": len({s.block for s in all_sites if s.block is not None})}
    for s in all_sites:
        shapes = out.setdefault(s.kind, [])
        if [s.d_in, s.d_out] not in shapes:
            shapes.append([s.d_in, s.d_out])
    return out


def init_head(rng: jax.Array, width: int, num_classes: int, kind: str = "zeros") -> dict:
    """Head initializers used by the official recipes (see docs: head (re-)initialization)."""
    if kind == "zeros":
        return {"kernel": jnp.zeros((width, num_classes)), "bias": jnp.zeros((num_classes,))}
    k1, k2 = jax.random.split(rng)
    if kind == "torch_linear":
        bound = 1.0 / math.sqrt(width)
        return {
            "kernel": jax.random.uniform(k1, (width, num_classes), minval=-bound, maxval=bound),
            "bias": jax.random.uniform(k2, (num_classes,), minval=-bound, maxval=bound),
        }
    if kind == "trunc_normal":
        return {
            "kernel": 0.02 * jax.random.truncated_normal(k1, -2.0, 2.0, (width, num_classes)),
            "bias": jnp.zeros((num_classes,)),
        }
    raise ValueError(f"unknown head init {kind!r}; use 'zeros', 'torch_linear' or 'trunc_normal'")


def check_adapter(method: Method, params: Tree, adapter: Tree) -> None:
    """Raises one error listing every mismatch between `adapter` and what `method.init` builds for
    `params` (missing leaves, unexpected leaves, other shapes): an adapter for a 2-block model on a
    3-block one, patch 8 on patch 4, another rank. Static (shapes only), so it also runs under jit."""
    expected = _expected_shapes(method, params)
    got = {p: tuple(np.shape(x)) for p, x in paths.flatten(adapter).items()}
    missing = [p for p in expected if p not in got]
    unexpected = [p for p in got if p not in expected]
    wrong = [f"{p} has shape {got[p]}, expected {expected[p]}" for p in expected if p in got and got[p] != expected[p]]
    problems = [f"{label} ({len(xs)}): {', '.join(xs[:6])}{', ...' if len(xs) > 6 else ''}"
                for label, xs in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if xs]
    if problems:
        raise ValueError(f"{method.name} expects adapter leaves that match method.init(rng, params) for these "
                         f"parameters and options ({method!r}); this adapter does not: " + "; ".join(problems)
                         + f". {method.adapter_hint()}An adapter fits one model (depth, widths, patch size) and the "
                         "method options it was built with: re-create it with method.init(rng, params) or use the "
                         "model and options it was trained with.")


def _expected_shapes(method: Method, params: Tree) -> dict[str, tuple[int, ...]]:
    sig = tuple((p, tuple(np.shape(x)), str(jnp.result_type(x))) for p, x in paths.flatten(params).items())
    try:
        return dict(_expected_cached(method, sig))
    except TypeError:  # unhashable hyper-parameters: no cache
        return dict(_expected_uncached(method, sig))


def _expected_uncached(method: Method, sig: tuple) -> tuple:
    abstract = paths.unflatten({p: jax.ShapeDtypeStruct(s, d) for p, s, d in sig})
    out = jax.eval_shape(lambda p: method.init(jax.random.PRNGKey(0), p), abstract)
    return tuple((p, tuple(x.shape)) for p, x in paths.flatten(out).items())


_expected_cached = functools.lru_cache(maxsize=64)(_expected_uncached)


# --- hyper-parameter validation (shared by the methods' __post_init__) ----------------------------
def check_positive_int(value: Any, option: str, method: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{method}: {option} must be a positive integer (>= 1), got {value!r}")


def check_number(value: Any, option: str, method: str, *, nonzero: bool = True) -> None:
    """A finite real number (and non-zero: a zero scale would make the adapter a no-op)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{method}: {option} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or (nonzero and float(value) == 0.0):
        valid = "a finite non-zero number" if nonzero else "a finite number"
        raise ValueError(f"{method}: {option} must be {valid}, got {value!r}")


def check_rate(value: Any, option: str, method: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{method}: {option} must be a float in [0, 1), got {value!r}")


def check_choice(value: Any, choices: Iterable[str], option: str, method: str) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{method}: unknown {option} {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_subset(values: Any, choices: tuple[str, ...], option: str, method: str) -> tuple[str, ...]:
    """A str or sequence of names, each one of `choices` (returned as a tuple)."""
    vals = (values,) if isinstance(values, str) else tuple(values)
    bad = [v for v in vals if v not in choices]
    if bad:
        raise ValueError(f"{method}: unknown {option}(s) {bad}; choose from {choices}")
    return vals


def check_regexes(patterns: Any, option: str, method: str) -> tuple[str, ...]:
    """A regex or a non-empty sequence of regexes that compile (returned as a tuple)."""
    pats = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not pats:
        raise ValueError(f"{method}: `{option}` is empty; give at least one regex")
    for p in pats:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{method}: invalid regex {p!r} in `{option}`: {e}") from None
    return pats


def check_blocks(value: Any, method: str) -> tuple[int, ...] | None:
    """`layers` option: None, or non-empty block indices >= 0 (returned as a tuple)."""
    if value is None:
        return None
    ls = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not ls or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in ls):
        raise ValueError(f"{method}: `layers` must be non-empty block indices >= 0, got {value!r}")
    return tuple(int(i) for i in ls)


def select_blocks(all_sites: Mapping[str, Any], layers: tuple[int, ...] | None, method: str) -> list[int]:
    """The blocks a `layers` option selects (None: every block), checked against the model."""
    have = sorted({s.block for s in all_sites.values() if s.block is not None})
    if layers is None:
        return have
    over = [i for i in layers if i not in have]
    if over:
        raise ValueError(f"{method}: `layers` {over} do not exist in a {len(have)}-block model; "
                         f"use block indices 0..{len(have) - 1}")
    return sorted(set(layers))


def check_placements(method: Method, field: str, choices: tuple[str, ...], option: str) -> None:
    """Validates and normalizes the options shared by RLRR and SSF: `init_scheme`, the placement
    subset `field` (names from `choices`), `layers` and the `targets` regex."""
    check_choice(method.init_scheme, ("official", "identity"), "init", method.name)
    object.__setattr__(method, field, check_subset(getattr(method, field), choices, option, method.name))
    object.__setattr__(method, "layers", check_blocks(method.layers, method.name))
    if method.targets is not None:
        check_regexes(method.targets, "targets", method.name)


def register_method(name: str):
    """Class decorator: registers a `Method` subclass under `name` for `get_method`, e.g.

        @jax_peft.register_method("my_scale")
        class MyScale(jax_peft.Method): ...

    The class becomes a frozen dataclass (its annotated fields are the hyper-parameters) if it is
    not one already. Built-in names cannot be replaced."""
    if name in _REGISTRY:
        raise ValueError(f"{name!r} is a built-in method; choose another name")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method needs a subclass of jax_peft.Method, got {cls!r}")
        cls.name = name
        if "__dataclass_fields__" not in cls.__dict__:
            cls = dataclasses.dataclass(frozen=True)(cls)
        _CLASSES[name] = cls
        return cls

    return deco


# user-registered methods: name -> class
_CLASSES: dict[str, type] = {}

# name -> "module:Class"; modules are imported on first use.
_REGISTRY: dict[str, str] = {
    "rlrr": "jax_peft.methods.rlrr:RLRR",
    "fact_tt": "jax_peft.methods.fact:FacTTT",
    "fact_tk": "jax_peft.methods.fact:FacTTK",
    "efft": "jax_peft.methods.efft:EFFT",
    "ssf": "jax_peft.methods.ssf:SSF",
    "lora": "jax_peft.methods.lora:LoRA",
    "bitfit": "jax_peft.methods.simple:BitFit",
    "linear": "jax_peft.methods.simple:Linear",
    "full": "jax_peft.methods.simple:Full",
    "rlrr_swin": "jax_peft.methods.swin_variants:RLRRSwin",
    "efft_swin": "jax_peft.methods.swin_variants:EFFTSwin",
    "fact_tt_swin": "jax_peft.methods.swin_variants:FacTTTSwin",
    "fact_tk_swin": "jax_peft.methods.swin_variants:FacTTKSwin",
}


def method_names() -> list[str]:
    return list(_REGISTRY) + [n for n in _CLASSES if n not in _REGISTRY]


def method_class(name: str) -> type[Method]:
    if name in _CLASSES:
        return _CLASSES[name]
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(method_names())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_method(name: str, **hparams: Any) -> Method:
    """Builds a method by name, e.g. `get_method("fact_tt", rank=8, scale=10.0)`.

    Unknown options raise a TypeError that lists the valid ones with their defaults.
    """
    cls = method_class(name)
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    aliases = dict(cls.hparam_aliases)
    for alias, field in aliases.items():
        if alias in hparams:
            if field in hparams:
                raise TypeError(f"give either {alias!r} or {field!r} for method {name!r}, not both")
            hparams[field] = hparams.pop(alias)
    unknown = sorted(set(hparams) - set(fields))
    for target in getattr(cls, "variants", {}).values():  # an option only a backbone variant has
        if unknown and set(hparams) <= {f.name for f in dataclasses.fields(method_class(target))}:
            return get_method(target, **hparams)
    if unknown:
        inverse = {f: a for a, f in aliases.items()}
        valid = ", ".join(f"{inverse.get(k, k)}={v!r}" for k, v in fields.items())
        raise TypeError(f"unknown option(s) {unknown} for method {name!r}; valid options: {valid}")
    return cls(**hparams)
