"""The official PyTorch formulations of the PEFT methods on a timm ViT, timed like scripts/benchmark.py.

Used by `scripts/benchmark.py` only when `torch` and `timm` are importable. Each method is written
the way its released code computes it (methods.md §3): LoRA as NOAH (fused qkv, `B(A(drop(x)))`),
FacT-TT/TK as the activation path with Dropout on the rank-r activation and the chunked MLP, EFFT as
factor dropout + merged weights, RLRR as the rescaled weight built in every forward, SSF as
scale-and-shift modules, BitFit / linear probe / full fine-tuning by `requires_grad`. The step is
`zero_grad → cross_entropy(model(x), y).backward() → AdamW.step()` in train mode.

Not exercised where torch is absent (the jax_peft development machine has no torch): treat its
numbers with the usual care and check a method against its released code before quoting a ratio.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _vit(cfg: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.hidden_size,
                             depth=cfg.num_layers, num_heads=cfg.num_heads,
                             mlp_ratio=cfg.mlp_dim / cfg.hidden_size, num_classes=cfg.num_classes)


def _param(*shape: int, scale: float = 0.02) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * scale)


class _SSF(nn.Module):
    """`module(x) * gamma + beta` (SSF; also RLRR's LN / patch-embedding parts)."""

    def __init__(self, module: nn.Module, dim: int):
        super().__init__()
        self.module, self.gamma, self.beta = module, nn.Parameter(1 + 0.02 * torch.randn(dim)), _param(dim)

    def forward(self, x):
        return self.module(x) * self.gamma + self.beta


class _LoRAQKV(nn.Module):
    """NOAH LoRA on the fused qkv: `qkv(x) + B(A(drop(x)))`."""

    def __init__(self, qkv: nn.Linear, r: int, p: float):
        super().__init__()
        d = qkv.in_features
        self.qkv, self.drop = qkv, nn.Dropout(p)
        self.a, self.b = nn.Linear(d, r, bias=False), nn.Linear(r, qkv.out_features, bias=False)
        nn.init.kaiming_uniform_(self.a.weight, a=math.sqrt(5))
        nn.init.normal_(self.b.weight, std=0.02)  # non-zero so the path is not trivially skipped

    def forward(self, x):
        return self.qkv(x) + self.b(self.a(self.drop(x)))


class _FacT(nn.Module):
    """Global FacT factors: U = Linear(D, r), V = Linear(r, D) (no bias), scale s, Dropout p."""

    def __init__(self, d: int, r: int, s: float, p: float):
        super().__init__()
        self.u, self.v = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        nn.init.normal_(self.v.weight, std=0.02)
        self.s, self.drop, self.r = s, nn.Dropout(p), r


class _FacTQKV(nn.Module):
    def __init__(self, qkv: nn.Linear, fact: _FacT, cores):
        super().__init__()
        self.qkv, self.cores, self.fact = qkv, cores, [fact]  # list: do not register fact per block

    def forward(self, x):
        f = self.fact[0]
        u = f.u(x)
        parts = [f.v(f.drop(u @ c())) for c in self.cores]
        return self.qkv(x) + f.s * torch.cat(parts, -1)


class _FacTLinear(nn.Module):
    """proj / fc1 / fc2 with the official FacT path (chunked for the MLP)."""

    def __init__(self, base: nn.Linear, fact: _FacT, core, kind: str):
        super().__init__()
        self.base, self.core, self.kind, self.fact = base, core, kind, [fact]

    def forward(self, x):
        f, c = self.fact[0], self.core()
        if self.kind == "proj":
            return self.base(x) + f.s * f.v(f.drop(f.u(x) @ c))
        if self.kind == "fc1":  # x U T1 (k r) -> drop -> k chunks of r -> each V -> concat
            h = f.drop(f.u(x) @ c)
            h = f.v(h.reshape(*h.shape[:-1], -1, f.r)).flatten(-2)
            return self.base(x) + f.s * h
        # fc2: h split into k chunks of D -> each U -> concat (k r) -> T2 -> drop -> V
        d = f.u.in_features
        h = f.u(x.reshape(*x.shape[:-1], -1, d)).flatten(-2)
        return self.base(x) + f.s * f.v(f.drop(h @ c))


def _fact(model: nn.Module, cfg: Any, kind: str, r: int, s: float, p: float) -> list:
    d, k, depth = cfg.hidden_size, cfg.mlp_dim // cfg.hidden_size, cfg.num_layers
    fact = _FacT(d, r, s, p)
    model.fact = fact
    if kind == "tt":
        model.fact_cores = nn.ParameterList()
        for blk in model.blocks:
            cs = [_param(r, r, scale=1 / math.sqrt(r)) for _ in range(4)]
            t1, t2 = _param(r, k * r, scale=1 / math.sqrt(r)), _param(k * r, r, scale=1 / math.sqrt(k * r))
            model.fact_cores.extend(cs + [t1, t2])
            get = lambda t: (lambda: t)
            blk.attn.qkv = _FacTQKV(blk.attn.qkv, fact, [get(c) for c in cs[:3]])
            blk.attn.proj = _FacTLinear(blk.attn.proj, fact, get(cs[3]), "proj")
            blk.mlp.fc1 = _FacTLinear(blk.mlp.fc1, fact, get(t1), "fc1")
            blk.mlp.fc2 = _FacTLinear(blk.mlp.fc2, fact, get(t2), "fc2")
    else:  # TK: core C (r, r, r), P (r, L·(4 + 2k)); block slices C ×3 P_l, official C-order MLP reshape
        c_all = 4 + 2 * k
        model.fact_c, model.fact_p = _param(r, r, r, scale=1 / r), _param(r, depth * c_all, scale=0.1)
        def slices(i):
            p = model.fact_p[:, i * c_all:(i + 1) * c_all]
            return torch.einsum("abc,cj->abj", model.fact_c, p)

        for i, blk in enumerate(model.blocks):
            att = [(lambda i, j: (lambda: slices(i)[:, :, j]))(i, j) for j in range(4)]
            f1 = (lambda i: lambda: slices(i)[:, :, 4:4 + k].reshape(r, k * r))(i)
            f2 = (lambda i: lambda: slices(i)[:, :, 4 + k:].reshape(r, k * r).t())(i)
            blk.attn.qkv = _FacTQKV(blk.attn.qkv, fact, att[:3])
            blk.attn.proj = _FacTLinear(blk.attn.proj, fact, att[3], "proj")
            blk.mlp.fc1 = _FacTLinear(blk.mlp.fc1, fact, f1, "fc1")
            blk.mlp.fc2 = _FacTLinear(blk.mlp.fc2, fact, f2, "fc2")
    return [p for n, p in model.named_parameters() if n.startswith("fact")]


class _Merged(nn.Module):
    """`F.linear(x, W + delta_fn(), b + shift)`: weight-form methods built in every forward."""

    def __init__(self, base: nn.Linear, delta_fn, shift=None):
        super().__init__()
        self.base, self.delta_fn, self.shift = base, delta_fn, shift

    def forward(self, x):
        w = self.delta_fn(self.base.weight)
        b = self.base.bias if self.shift is None else self.base.bias + self.shift
        return F.linear(x, w, b)


def _efft(model: nn.Module, cfg: Any, r: int, s: float, p: float) -> list:
    """Released EFFT: one increment for all blocks, Dropout on the factor entries (fresh per use)."""
    d, m = cfg.hidden_size, cfg.mlp_dim
    e = nn.ParameterDict({"u1": _param(d, r), "v1": _param(r, d), "c1": _param(r, r, 4),
                          "u2": _param(d, r), "v2": _param(r, m), "c2": _param(r, r, 2)})
    model.efft = e
    drop = nn.Dropout(p)
    for blk in model.blocks:
        def qkv_delta(w, cache):
            u1, c1, v1 = drop(e["u1"]), drop(e["c1"]), drop(e["v1"])
            cache["o"] = s * (u1 @ c1[:, :, 3] @ v1)  # proj uses the same masks in this block call
            return w + s * torch.cat([(u1 @ c1[:, :, j] @ v1).t() for j in range(3)], 0)
        state: dict = {}
        blk.attn.qkv = _Merged(blk.attn.qkv, lambda w, st=state: qkv_delta(w, st))
        blk.attn.proj = _Merged(blk.attn.proj, lambda w, st=state: w + st["o"].t())
        blk.mlp.fc1 = _Merged(blk.mlp.fc1, lambda w: w + s * (drop(e["u2"]) @ drop(e["c2"][:, :, 0])
                                                             @ drop(e["v2"])).t())
        blk.mlp.fc2 = _Merged(blk.mlp.fc2, lambda w: w + s * (drop(e["u2"]) @ drop(e["c2"][:, :, 1])
                                                             @ drop(e["v2"])))
    return list(e.parameters())


def _rlrr(model: nn.Module, cfg: Any) -> list:
    """RLRR: W' = W ⊙ (1 + s_out s_inᵀ) (separate q, k, v), b' = b + f, SSF after LN1/LN2/final/patch."""
    d = cfg.hidden_size
    new: list = []

    def rescale(lin: nn.Linear, groups: int):
        out, inp = lin.out_features // groups, lin.in_features
        s_in = nn.Parameter(torch.empty(groups, inp).uniform_(-math.sqrt(6 / inp), math.sqrt(6 / inp)))
        s_out = nn.Parameter(torch.empty(groups, out).uniform_(-math.sqrt(6), math.sqrt(6)))
        f = nn.Parameter(torch.zeros(lin.out_features))
        new.extend([s_in, s_out, f])

        def delta(w):
            scale = 1 + torch.einsum("go,gi->goi", s_out, s_in).reshape(w.shape)
            return w * scale
        return _Merged(lin, delta, f)

    for blk in model.blocks:
        blk.attn.qkv = rescale(blk.attn.qkv, 3)
        blk.attn.proj = rescale(blk.attn.proj, 1)
        blk.mlp.fc1 = rescale(blk.mlp.fc1, 1)
        blk.mlp.fc2 = rescale(blk.mlp.fc2, 1)
        blk.norm1, blk.norm2 = _SSF(blk.norm1, d), _SSF(blk.norm2, d)
        new.extend(list(blk.norm1.parameters())[-2:] + list(blk.norm2.parameters())[-2:])
    model.patch_embed, model.norm = _SSF(model.patch_embed, d), _SSF(model.norm, d)
    new.extend([model.patch_embed.gamma, model.patch_embed.beta, model.norm.gamma, model.norm.beta])
    model.rlrr_params = nn.ParameterList(new)
    return new


def _ssf(model: nn.Module, cfg: Any) -> list:
    d, m = cfg.hidden_size, cfg.mlp_dim
    for blk in model.blocks:
        blk.norm1, blk.norm2 = _SSF(blk.norm1, d), _SSF(blk.norm2, d)
        blk.attn.qkv, blk.attn.proj = _SSF(blk.attn.qkv, 3 * d), _SSF(blk.attn.proj, d)
        blk.mlp.fc1, blk.mlp.fc2 = _SSF(blk.mlp.fc1, m), _SSF(blk.mlp.fc2, d)
    model.patch_embed, model.norm = _SSF(model.patch_embed, d), _SSF(model.norm, d)
    return [p for n, p in model.named_parameters() if n.endswith(("gamma", "beta"))]


def build(cfg: Any, name: str, hp: dict) -> tuple[nn.Module, list]:
    """A timm ViT with `name`'s official formulation; returns (model, trainable parameters)."""
    model = _vit(cfg)
    for p in model.parameters():
        p.requires_grad_(name == "full")
    if name == "full":
        extra = []
    elif name == "linear":
        extra = []
    elif name == "bitfit":
        extra = [p for n, p in model.named_parameters() if "bias" in n and not n.startswith("head")]
    elif name == "lora":
        extra = []
        for blk in model.blocks:
            blk.attn.qkv = _LoRAQKV(blk.attn.qkv, hp.get("rank", 8), hp.get("dropout", 0.1))
            extra += [blk.attn.qkv.a.weight, blk.attn.qkv.b.weight]
    elif name in ("fact_tt", "fact_tk"):
        extra = _fact(model, cfg, name[-2:], hp.get("rank", 8), hp.get("scale", 1.0), hp.get("dropout", 0.1))
    elif name == "efft":
        extra = _efft(model, cfg, hp.get("rank", 16), hp.get("scale", 1.0), hp.get("dropout", 0.1))
    elif name == "rlrr":
        extra = _rlrr(model, cfg)
    elif name == "ssf":
        extra = _ssf(model, cfg)
    else:
        raise ValueError(f"no PyTorch formulation for {name!r}")
    for p in list(model.head.parameters()) + extra:
        p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable


def _time(fn, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(args: Any, methods: list[str], cfg: Any = None, hparams: dict | None = None) -> dict:
    """{"torch", "threads", "forward_s", "methods": {name: {"step_s", "times_s"}}} on the same shapes."""
    import benchmark  # scripts/benchmark.py (for the model config and hyper-parameters)

    cfg = cfg or benchmark.model_config(args)
    hparams = hparams or benchmark.METHODS
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(args.seed)
    x = torch.from_numpy(rng.uniform(-1, 1, (args.batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, cfg.num_classes, args.batch))
    res: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "methods": {}}

    model = _vit(cfg).eval()
    with torch.no_grad():
        res["forward_s"] = statistics.median(_time(lambda: model(x), args.warmup, args.runs))
    model = None  # free the forward-only model before building the next
    for name in methods:
        model, trainable = build(cfg, name, hparams.get(name, {}))
        model.train()
        opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        times = _time(step, args.warmup, args.runs)
        res["methods"][name] = {"step_s": statistics.median(times), "times_s": times,
                                "trainable_params": sum(p.numel() for p in trainable)}
        print(f"torch {name}: {res['methods'][name]['step_s']:.3f}s", flush=True)
        model = opt = None
    return res
