"""The demo's runs (`python -m jax_peft.demo --workdir DIR` drives them; each also runs alone):

    python -m jax_peft.main --config jax_peft.configs.demo:pretrain --workdir DIR/pretrain
    python -m jax_peft.main --config jax_peft.configs.demo:rlrr --workdir DIR/rlrr \
        --config.model.checkpoint=DIR/upstream_vit_seed0_<hash>.npz

`pretrain`: a small ViT (patch 8, width 96, 3 blocks, 32x32 images) trained from scratch with `full`
on `synthetic/upstream` (colour x texture, one object). Any other argument is a method name
(`rlrr`, `fact_tt`, `fact_tk`, `lora`, `linear`, `full`, `ssf`, `bitfit`, `efft`) adapting the
pretrained checkpoint (`model.checkpoint`, a Google-layout .npz) to `synthetic/downstream` (colour
of the left of two objects). Append `,quick` (e.g. `rlrr,quick`) for the reduced size used by tests.
Learning rates are per method (each tuned on the validation split, the probe included).
"""

from jax_peft.train.config import default_config, method_config

# Per method: (lr, method hyper-parameters), chosen on the val split (seed 0, 200 steps): the probe's lr
# from {3e-3, 1e-2, 3e-2} (val 0.594 / 0.598 / 0.584), RLRR's from {1e-2, 3e-2}, FacT-TT's from
# {(5e-3, scale 1), (1e-2, scale 5)}, LoRA's from {5e-3, 1e-2, 2e-2}. Dropout is off (short runs,
# 4k images). The demo runs 300 steps: LoRA, FacT and RLRR were still improving at 200 while the
# probe had plateaued near its ~0.56 ceiling (it cannot tell the two objects apart).
ADAPT = {
    "linear": (1e-2, {}),
    "rlrr": (3e-2, {}),
    "fact_tt": (1e-2, dict(rank=8, scale=5.0, dropout=0.0)),
    "fact_tk": (1e-2, dict(rank=8, scale=5.0, dropout=0.0)),
    "lora": (1e-2, dict(rank=8, dropout=0.0, targets=("q", "k", "v"))),
    "full": (1e-3, {}),
    "ssf": (1e-2, {}),
    "bitfit": (1e-2, {}),
    "efft": (1e-2, {}),
}
PRETRAIN_STEPS, ADAPT_STEPS = 400, 300
QUICK_PRETRAIN_STEPS, QUICK_ADAPT_STEPS = 8, 6


def get_config(arg: str | None = None):
    parts = [p for p in (arg or "pretrain").split(",") if p]
    quick = "quick" in parts
    parts = [p for p in parts if p != "quick"]
    which = parts[0] if parts else "pretrain"
    if which != "pretrain" and which not in ADAPT:
        raise ValueError(f"jax_peft.configs.demo argument {which!r}: use 'pretrain' or one of {sorted(ADAPT)}")

    c = default_config()
    c.model.gelu = "exact"
    c.model.image_size = 32
    c.data.image_size = 32
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.hflip = False
    c.schedule.kind = "cosine"
    c.schedule.warmup_lr = 0.0
    c.optimizer.name = "adamw"
    c.optimizer.grad_clip_norm = 1.0
    c.batch_size = 128
    c.seed = 0
    c.log_every = 25
    c.keep_checkpoints = 1
    c.keep_best = False
    c.progress = False

    if which == "pretrain":
        c.model.name = ""
        c.model.checkpoint = "random"
        c.model.patch_size = 8
        c.model.hidden_size = 96 if not quick else 32
        c.model.num_layers = 3 if not quick else 1
        c.model.num_heads = 3 if not quick else 2
        c.model.mlp_dim = 192 if not quick else 64
        c.method = method_config("full")
        c.data.name = "synthetic/upstream"
        c.optimizer.lr = 2e-3
        c.optimizer.weight_decay = 0.05
        c.schedule.warmup_steps = 30 if not quick else 1
        c.schedule.min_lr = 1e-5
        c.total_steps = PRETRAIN_STEPS if not quick else QUICK_PRETRAIN_STEPS
        c.export_merged = True   # DIR/merged.npz: the pretrained backbone, Google layout
    else:
        lr, hparams = ADAPT[which]
        c.model.name = ""
        c.model.checkpoint = "upstream_vit.npz"  # set by the demo to its pretrained file
        c.method = method_config(which, **hparams)
        c.data.name = "synthetic/downstream"
        c.optimizer.lr = lr
        c.optimizer.weight_decay = 1e-4
        c.schedule.warmup_steps = 20 if not quick else 1
        c.schedule.min_lr = 1e-5
        c.total_steps = ADAPT_STEPS if not quick else QUICK_ADAPT_STEPS
    c.eval_every = 0               # evaluate on val at the end only
    c.checkpoint_every = c.total_steps
    return c
