"""The training CLI's loop on a Swin (jax_peft.configs.smoke:swin,<method>, a generated tiny Swin
checkpoint): train, preempt + resume, eval mode, merged export, in process."""

from __future__ import annotations

import json
import os

import numpy as np
from test_train_loop import _compilation_cache  # noqa: F401 (autouse fixture: shared XLA cache)

import jax_peft
from jax_peft.configs import smoke
from jax_peft.train import loop


def test_swin_trains_resumes_evaluates_and_exports(tmp_path):
    c = smoke.get_config("swin,rlrr")  # rlrr runs its Swin variant (the merging reductions gain a bias)
    c.model.checkpoint = smoke.smoke_swin_checkpoint(str(tmp_path), depths=(1, 1))  # one block per stage: quicker
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 4, 4, 2, 1
    c.batch_size, c.schedule.warmup_steps, c.progress, c.data.worker_processes = 8, 0, False, 0
    workdir = str(tmp_path / "run")
    assert loop.train_and_evaluate(c, workdir, stop_at=2) == {"preempted": True, "step": 2}
    summary = loop.train_and_evaluate(c, workdir)  # resumes from step 2
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert summary["steps"] == 4 and summary["trainable_params"] > 0
    assert loop.evaluate(c, workdir)["eval_accuracy"] == summary["final_eval_accuracy"]
    path = loop.export(c, workdir)
    assert path.endswith("merged.safetensors")
    merged = jax_peft.load_checkpoint(path)
    assert "bias" in merged["layers_0"]["downsample"]["reduction"]
    assert np.shape(merged["head"]["kernel"]) == (32, 4)
