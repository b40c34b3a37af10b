"""Peak memory of block-by-block compression, predicted on a CPU: what the GPU would hold, without one.

    python benchmarks/quality/cpu_peak.py                 # LLaMA-7B-shaped block, 2 x 2,048 tokens (~6 min)
    python benchmarks/quality/cpu_peak.py --tiny          # a toy block (seconds)

Why: the offloaded GPU peak of ``bigmodel.py`` (issue 15's target: <= 3 x one block's weights + its
calibration activations) is set by the tensors alive at one moment of the pipeline, and device time is
scarce. Every tensor an operator creates passes through a ``TorchDispatchMode``; this one adds up the
bytes of the storages created while compressing (freed when the storage dies) and records which are
alive at the highest point, grouped by the innermost ``flashsvd`` frame that made them. Tensors that
existed before (the model's weights) are not counted, except where the pipeline re-creates them.

Calibrated against the H200 (2026-11-30): for the code before ``settle_`` this predicts 5.462 GiB where
``torch.cuda.max_memory_allocated`` measured 5.464 GiB on the same shapes. The CPU runs unfused
reproducible-sum updates (a few more row-block temporaries than CUDA's one compiled kernel), so it
errs high during calibration.
"""

from __future__ import annotations

import argparse
import time
import traceback
import weakref
from pathlib import Path

import torch
from bigmodel import LLAMA_7B, TINY, build, grouped_sizes  # same folder: run as a script from anywhere
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTracker(TorchDispatchMode):
    """Live bytes of the storages created under this mode, their peak, and what was alive at it."""

    def __init__(self, big: int = 16 << 20) -> None:
        super().__init__()
        self.current = self.peak = 0
        self.live: dict[int, tuple[int, str | None]] = {}
        self.at_peak: dict[int, tuple[int, str | None]] = {}
        self.big = big  # only storages this large get a stack walk (it is slow)

    def _free(self, key: int) -> None:
        size, _ = self.live.pop(key, (0, None))
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, size = id(storage), storage.nbytes()
            if key in self.live or size == 0:
                continue
            where = None
            if size >= self.big:
                ours = [f for f in traceback.extract_stack() if "flashsvd" in f.filename]
                where = (
                    f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else str(func)
                )
            self.live[key] = (size, where)
            self.current += size
            weakref.finalize(storage, self._free, key)
            if self.current > self.peak:
                self.peak, self.at_peak = self.current, dict(self.live)
        return out

    def report(self, top: int = 14) -> list[str]:
        title = f"peak {self.peak / 2**30:.3f} GiB of tensors created while compressing"
        items = [(size, where or "smaller tensors") for size, where in self.at_peak.values()]
        return grouped_sizes(title, items, top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--n-calib", type=int, default=2, help="sequences (the peak does not grow with them)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--keep", type=float, default=0.6)
    a = p.parse_args()

    import flashsvd.models as fm
    from flashsvd.models.recipe import Recipe

    cfg = dict(TINY if a.tiny else LLAMA_7B)
    cfg["num_hidden_layers"] = 1
    seq = min(a.seq, cfg["max_position_embeddings"])
    model = build(cfg, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg["vocab_size"], (1, seq), generator=g) for _ in range(a.n_calib)]
    recipe = Recipe(name="big-sequential", method="whiten", allocation="uniform", sequential=True, paired=False,
                    rank_multiple=64, calib_samples=a.n_calib, calib_window=seq)  # fmt: skip
    tracker = PeakTracker()
    t0 = time.perf_counter()
    with tracker:
        fm.compress(model, recipe=recipe, keep_ratio=a.keep, calibration=batches, device="cpu", offload=True)
    print("\n".join(tracker.report()))
    print(f"{time.perf_counter() - t0:.0f} s; torch {torch.__version__}")


if __name__ == "__main__":
    main()
