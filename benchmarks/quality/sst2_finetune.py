"""SST-2 accuracy of all-MiniLM-L6-v2 classifiers: dense vs compressed (keep 0.75) before/after fine-tuning.

Protocol (every step through ``flashsvd.app``, the same code the CLI runs):

1. fine-tune the packaged all-MiniLM-L6-v2 + a classification head on ``sst2/train.tsv`` (all parameters);
2. for each method: compress that classifier at ``--keep-ratio`` (data-aware methods calibrate on
   ``--calib-samples`` labelled training sentences), score it on ``sst2/dev.tsv`` (before), fine-tune its
   low-rank factors and head on the same training data, score it again (after);
3. append one CSV row per model to ``--out`` as soon as it is measured (dense first).

``--train-samples``/``--dev-samples`` take seeded subsets so the run fits a CPU budget; the CSV records
the sizes used. ``--dense-checkpoint DIR`` trains the dense classifier once and lets later processes
(one per method, in parallel on one GPU) reuse it. Usage (the committed GPU table: full splits)::

    python benchmarks/quality/sst2_finetune.py --data-dir ../shared/data --device cuda \
        --dense-epochs 2 --epochs 2 --lr 5e-5 --max-length 64 --calib-samples 256 \
        --dense-checkpoint /tmp/dense_sst2 --methods svd,fwsvd,whiten \
        --out benchmarks/results/sst2_finetune_h100.csv
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

COLUMNS = ["model", "method", "keep_ratio", "kept_fraction", "params", "acc_before_ft", "acc_after_ft",
           "dense_acc", "delta_vs_dense", "train_samples", "dev_samples", "epochs", "steps", "learning_rate",
           "batch_size", "max_length", "calibration", "seconds", "device", "torch", "transformers", "date"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sst2_finetune.csv"))
    ap.add_argument("--methods", default="svd,fwsvd,whiten,svdllm,asvd,ars")
    ap.add_argument("--keep-ratio", type=float, default=0.75)
    ap.add_argument("--train-samples", type=int, default=None)
    ap.add_argument("--dev-samples", type=int, default=None)
    ap.add_argument("--dense-epochs", type=float, default=1.0)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--dense-lr", type=float, default=5e-5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument(
        "--sequential",
        default="svdllm",
        help="comma-separated methods calibrated block by block on the compressed model's own "
        "activations (SVD-LLM's protocol); the others calibrate all at once",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--dense-checkpoint",
        type=Path,
        default=None,
        help="fine-tuned dense classifier folder: reused when it exists (so several processes can "
        "share one dense model), else trained and saved there",
    )
    args = ap.parse_args()

    import torch
    import transformers

    from flashsvd.app import modelio
    from flashsvd.app.compression import RankChoice, compress_model
    from flashsvd.app.console import Console, silence_libraries
    from flashsvd.app.runtime import resolve_device, timestamp
    from flashsvd.app.tasks.data import load_examples
    from flashsvd.app.tasks.registry import get_task
    from flashsvd.app.training import TrainConfig, evaluate_dev, train

    silence_libraries()
    console = Console()
    device = resolve_device(args.device)
    spec = get_task("sst2")
    train_data = load_examples(spec, "train", args.data_dir / "sst2" / "train.tsv").subset(
        args.train_samples, 0
    )
    dev = load_examples(spec, "dev", args.data_dir / "sst2" / "dev.tsv").subset(args.dev_samples, 0)
    calib = train_data.subset(min(args.calib_samples, len(train_data)), 1)
    source = modelio.resolve("default")
    tok = modelio.load_tokenizer(source)
    work = Path(tempfile.mkdtemp(prefix="sst2_ft_"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fresh = not args.out.exists()
    fh = args.out.open("a", newline="")
    writer = csv.DictWriter(fh, fieldnames=COLUMNS)
    if fresh:
        writer.writeheader()

    def cfg(epochs: float, lr: float, train_all: bool) -> TrainConfig:
        return TrainConfig(epochs=epochs, learning_rate=lr, batch_size=args.batch_size, max_length=args.max_length,
                           train_all=train_all, eval_batch_size=128)  # fmt: skip

    def row(**kw) -> None:
        base = {"train_samples": len(train_data), "dev_samples": len(dev), "batch_size": args.batch_size,
                "max_length": args.max_length, "device": str(device), "torch": torch.__version__,
                "transformers": transformers.__version__, "date": timestamp()}  # fmt: skip
        writer.writerow(base | kw)
        fh.flush()
        print(kw, flush=True)

    t0 = time.perf_counter()
    dense_dir = args.dense_checkpoint or work / "dense_final"
    reuse = (dense_dir / "config.json").is_file()
    if reuse:
        dense = modelio.load(modelio.resolve(str(dense_dir))).to(device)
    else:
        dense = modelio.load(source, head="classification", num_labels=2).to(device)
        state = train(dense, tok, spec, train_data, dev, cfg(args.dense_epochs, args.dense_lr, True),
                      work / "dense", device, console)  # fmt: skip
    dense_acc = evaluate_dev(dense, tok, spec, dev, cfg(1, 0, True), device)["accuracy"]
    if reuse:
        print(f"reusing the dense classifier in {dense_dir}: dev accuracy {dense_acc:.4f}", flush=True)
    else:
        dense.save_pretrained(dense_dir)
        tok.save_pretrained(dense_dir)
        row(model="dense", method="dense", keep_ratio=1.0, kept_fraction=1.0,
            params=modelio.count_parameters(dense), acc_before_ft=None, acc_after_ft=dense_acc, dense_acc=dense_acc,
            delta_vs_dense=0.0, epochs=args.dense_epochs, steps=state.step, learning_rate=args.dense_lr,
            seconds=time.perf_counter() - t0)  # fmt: skip
    del dense
    dense_src = modelio.resolve(str(dense_dir))
    sequential = {m.strip() for m in args.sequential.split(",") if m.strip()}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t0 = time.perf_counter()
        model = modelio.load(dense_src).to(device)
        model, report = compress_model(model, tok, method, RankChoice(keep_ratio=args.keep_ratio), console,
                                       task="sst2", data_dir=args.data_dir, calib_samples=len(calib),
                                       calib_max_length=args.max_length, sequential=method in sequential)  # fmt: skip
        before = evaluate_dev(model, tok, spec, dev, cfg(1, 0, False), device)["accuracy"]
        state = train(model, tok, spec, train_data, dev, cfg(args.epochs, args.lr, False), work / method, device,
                      console)  # fmt: skip
        after = evaluate_dev(model, tok, spec, dev, cfg(1, 0, False), device)["accuracy"]
        row(model=f"{method}@{args.keep_ratio:g}", method=method, keep_ratio=args.keep_ratio,
            kept_fraction=report.kept_fraction, params=report.params_after, acc_before_ft=before, acc_after_ft=after,
            dense_acc=dense_acc, delta_vs_dense=after - dense_acc, epochs=args.epochs, steps=state.step,
            calibration="sequential" if method in sequential else "all-at-once",
            learning_rate=args.lr, seconds=time.perf_counter() - t0)  # fmt: skip
        del model
    fh.close()


if __name__ == "__main__":
    main()
