"""``compress`` under ``torchrun --nproc-per-node 2`` (gloo, CPU) gives the model of one process, bit for bit.

Covers the two integration points in ``compress.py`` (statistics collected on shards and all-reduced;
matrices factorized on different ranks and broadcast) for sequential whitening (svdllm) and for Fisher
statistics (fwsvd, which needs whole batches per shard). The ranks run this file as a script; so does
the one-process reference (``--nproc-per-node 1``), so both see the same threads and the same kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

import flashsvd.models as fm
from flashsvd.methods.distributed import get_rank, init_from_env

CASES = {"svdllm_sequential": ("svdllm", True), "fwsvd": ("fwsvd", False)}


def _compress(case: str) -> dict[str, torch.Tensor]:
    method, sequential = CASES[case]
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                        vocab_size=100, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = T.LlamaForCausalLM(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(5):
        ids = torch.randint(1, 100, (1 + i % 2, 10), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    model, report = fm.compress(
        model, method=method, keep_ratio=0.6, calibration=batches, sequential=sequential
    )
    out = {k: v.detach() for k, v in model.state_dict().items()}
    out["tokens"] = torch.tensor(report.calibration["tokens"])
    return out


def _torchrun(case: str, nproc: int, out: Path) -> list[dict[str, torch.Tensor]]:
    env = dict(
        os.environ,
        FLASHSVD_DIST_TIMEOUT="120",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        MKL_CBWR="COMPATIBLE",
    )  # MKL on CPU: results independent of buffer alignment
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           __file__, case, str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_model_of_one_process(case, tmp_path):
    """Identical checkpoints: statistics are order-independent sums, so sharding changes no bit."""
    (ref,) = _torchrun(case, 1, tmp_path / "one")
    r0, r1 = _torchrun(case, 2, tmp_path / "two")
    assert r0.keys() == ref.keys()
    for key, want in ref.items():
        assert torch.equal(r0[key], r1[key]), key  # every rank installed the same factors
        assert torch.equal(r0[key], want), (key, float((r0[key].double() - want.double()).abs().max()))


if __name__ == "__main__":
    init_from_env()
    torch.save(_compress(sys.argv[1]), Path(sys.argv[2], f"rank{get_rank()}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
