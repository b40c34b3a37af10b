"""Run a model over a task's data and score it: classification/regression heads, zero-shot STS, perplexity.

Zero-shot STS (embedding models such as all-MiniLM-L6-v2): mean-pooled last hidden states (padding masked),
cosine similarity of the two sentences, Spearman/Pearson against the gold 0-5 scores.

Perplexity (causal LMs): the text is tokenized once, cut into non-overlapping windows of ``seq_len`` tokens
(at most ``max_tokens`` in all), and ``exp(Σ NLL / Σ predicted tokens)`` is reported; each window predicts
its tokens 2..n from the ones before it (no context carried across windows).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flashsvd.app.tasks import metrics as M
from flashsvd.app.tasks.data import Examples
from flashsvd.app.tasks.registry import TaskSpec


def batches(examples: Examples, batch_size: int) -> Iterator[tuple[list[str], list[str] | None, list[float]]]:
    for i in range(0, len(examples), batch_size):
        pairs = None if examples.pairs is None else examples.pairs[i : i + batch_size]
        yield examples.texts[i : i + batch_size], pairs, examples.labels[i : i + batch_size]


def tokenize(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int, device: Any) -> dict:
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def score(spec: TaskSpec, predictions: list[float], labels: list[float]) -> dict[str, float]:
    """Every metric of ``spec`` (main one first)."""
    out = {}
    for name in spec.metrics:
        if name in ("pearson", "spearman"):
            out[name] = M.METRICS[name](predictions, labels)
        else:
            out[name] = M.METRICS[name]([int(p) for p in predictions], [int(y) for y in labels])
    return out


def predict_head(
    model: Any,
    tokenizer: Any,
    examples: Examples,
    spec: TaskSpec,
    batch_size: int,
    max_length: int,
    device: Any,
    progress=None,
) -> list[float]:
    """Class ids (argmax) or regression scores from a sequence-classification model."""
    import torch

    preds: list[float] = []
    model.eval()
    total = (len(examples) + batch_size - 1) // batch_size
    it = batches(examples, batch_size)
    for texts, pairs, _ in (
        progress(it, desc=f"eval {spec.name}", total=total, unit="batch") if progress else it
    ):
        with torch.inference_mode():
            logits = model(**tokenize(tokenizer, texts, pairs, max_length, device)).logits.float()
        if spec.kind == "regression":
            preds += logits.view(-1).tolist()
        else:
            preds += logits.argmax(-1).tolist()
    return preds


def mean_pool(hidden: Any, mask: Any) -> Any:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embed(model: Any, tokenizer: Any, texts: list[str], max_length: int, device: Any) -> Any:
    import torch

    enc = tokenize(tokenizer, texts, None, max_length, device)
    with torch.inference_mode():
        out = model(**enc)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return mean_pool(hidden.float(), enc["attention_mask"])


def predict_sts_zeroshot(
    model: Any,
    tokenizer: Any,
    examples: Examples,
    batch_size: int,
    max_length: int,
    device: Any,
    progress=None,
) -> list[float]:
    """Cosine similarity of mean-pooled embeddings for every sentence pair."""
    import torch

    if examples.pairs is None:
        raise ValueError("zero-shot STS needs sentence pairs")
    model.eval()
    sims: list[float] = []
    total = (len(examples) + batch_size - 1) // batch_size
    it = batches(examples, batch_size)
    for texts, pairs, _ in (
        progress(it, desc="eval sts (zero-shot)", total=total, unit="batch") if progress else it
    ):
        a = embed(model, tokenizer, texts, max_length, device)
        b = embed(model, tokenizer, pairs, max_length, device)
        sims += torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
    return sims


def perplexity(
    model: Any, tokenizer: Any, text: str, seq_len: int, max_tokens: int | None, device: Any, progress=None
) -> dict[str, float]:
    """Perplexity over non-overlapping windows (see the module docstring)."""
    import torch

    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    model.eval()
    nll, count = 0.0, 0
    it = range(n_windows)
    for w in progress(it, desc="perplexity", total=n_windows, unit="window") if progress else it:
        window = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0).to(device)
        with torch.inference_mode():
            logits = model(input_ids=window).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll += float(loss)
        count += seq_len - 1
    return {
        "perplexity": M.perplexity(nll, count),
        "nll_per_token": nll / count,
        "tokens": count,
        "windows": n_windows,
        "seq_len": seq_len,
    }
