"""``flashsvd compress`` under ``torchrun --nproc-per-node 2`` (gloo on CPU): same model as one process.

Only rank 0 prints its result and writes the checkpoint (atomically: no partial folder is left).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def _args(data_dir, out):
    return ["compress", "--model", "default", "--method", "whiten", "--rank-attn", "8", "--task", "stsb",
            "--data-dir", str(data_dir), "--calib-samples", "16", "--calib-batch-size", "4",
            "--calib-max-length", "32", "--device", "cpu", "--output", str(out)]  # fmt: skip


def test_torchrun_two_ranks_writes_once_and_matches_one_process(cli, data_dir, tmp_path):
    from transformers import AutoTokenizer

    from flashsvd.models import load

    single = tmp_path / "single"
    res = cli(*_args(data_dir, single), "--quiet")
    assert res.exit_code == 0, res.output

    two = tmp_path / "two" / "ckpt"
    env = dict(os.environ, FLASHSVD_DIST_TIMEOUT="120", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "flashsvd.app", *_args(data_dir, two), "--json"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing
    assert result["report"]["calibration"]["batches"] == 4
    assert sorted(p.name for p in two.parent.iterdir()) == ["ckpt"]  # no partial folder left behind

    a, b = load(single), load(two)
    report_a = json.loads((single / "flashsvd_report.json").read_text())["report"]
    assert result["report"]["ranks"] == report_a["ranks"]
    assert result["report"]["params_after"] == report_a["params_after"]
    assert result["report"]["calibration"]["tokens"] == report_a["calibration"]["tokens"]
    tok = AutoTokenizer.from_pretrained(single)
    enc = tok(["a distributed run", "gives the same model"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ya, yb = a(**enc).last_hidden_state, b(**enc).last_hidden_state
    assert torch.allclose(ya, yb, rtol=0, atol=1e-4 * float(ya.abs().max())), float((ya - yb).abs().max())
