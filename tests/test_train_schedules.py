"""Learning-rate schedules: timm's per-epoch stepping (docs/methods.md §5 reference values) and per-step cosine."""

import numpy as np
import pytest

from jax_peft.train import schedules
from jax_peft.train.config import default_config


def _sig4(x: float) -> float:
    return float(f"{x:.4g}")


FACT = dict(lr=1e-3, warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-5, cosine_epochs=100)
RLRR = dict(lr=1e-3, warmup_epochs=10, warmup_lr=1e-7, min_lr=1e-8, cosine_epochs=100)


def test_fact_reference_values():
    lrs = schedules.timm_epoch_lrs(100, step_offset="after_epoch", **FACT)
    assert lrs[0] == 1e-6 and lrs[1] == 1e-6
    assert [_sig4(lrs[e]) for e in (2, 10, 11, 50, 99)] == [1.009e-4, 9.001e-4, 9.758e-4, 5.205e-4, 1.098e-5]


def test_rlrr_reference_values_with_cooldown():
    lrs = schedules.timm_epoch_lrs(110, step_offset="after_epoch", **RLRR)
    assert [_sig4(lrs[e]) for e in (11, 99, 100)] == [9.755e-4, 9.966e-7, 2.567e-7]
    np.testing.assert_array_equal(lrs[101:110], np.full(9, 1e-8))


def test_ssf_before_epoch_uses_f_of_e():
    lrs = schedules.timm_epoch_lrs(110, step_offset="before_epoch", **FACT)
    for e in (0, 5, 10, 42, 99, 100, 109):
        assert lrs[e] == schedules.timm_cosine_value(e, **FACT)
    assert lrs[0] == 1e-6 and np.all(lrs[100:] == 1e-5)


def test_step_schedule_is_constant_within_an_epoch_and_matches_the_table():
    spe = 15
    sched = schedules.timm_epoch_schedule(spe, 100, step_offset="after_epoch", **FACT)
    table = schedules.timm_epoch_lrs(100, step_offset="after_epoch", **FACT).astype(np.float32)
    steps = np.arange(0, 100 * spe + 30)  # past the end: clamped to the last epoch
    got = np.asarray([sched(int(s)) for s in steps[::7]])
    want = table[np.minimum(steps[::7] // spe, 99)]
    np.testing.assert_array_equal(got, want)
    assert float(sched(2 * spe - 1)) == np.float32(1e-6) and float(sched(2 * spe)) == table[2]


def test_make_schedule_from_config():
    c = default_config().schedule
    c.kind = "timm_epoch"
    c.warmup_epochs, c.warmup_lr, c.min_lr, c.cosine_epochs = 10, 1e-7, 1e-8, 100
    sched = schedules.make_schedule(c, lr=1e-3, total_steps=110 * 32, steps_per_epoch=32)
    assert _sig4(float(sched(11 * 32))) == 9.755e-4
    assert float(sched(110 * 32 - 1)) == np.float32(1e-8)

    c.kind, c.warmup_steps, c.warmup_lr, c.min_lr = "cosine", 10, 0.0, 1e-5
    sched = schedules.make_schedule(c, lr=1e-3, total_steps=100, steps_per_epoch=1)
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(100)) == pytest.approx(1e-5)
    assert float(sched(5)) == pytest.approx(5e-4)

    c.kind = "cosinus"
    with pytest.raises(ValueError, match="cosine"):
        schedules.make_schedule(c, lr=1e-3, total_steps=100, steps_per_epoch=1)
