"""Calibration windows sampled from the model itself, each continuing a prompt cut from the user's text.

Why: a decoder's statistics (input covariances, loss curves) should describe the text it will read and
write, and the calibration file a user has at hand is often narrow: SST-2's lower-cased movie-review
fragments gave SmolLM2-135M a WikiText-2 perplexity of 71.0 at keep 0.8; the same recipe calibrated
on the model's own continuations of 8-token prompts from that file gave 60.3 through the CLI
(``benchmarks/results/QUALITY.md``; cf. Williams et al., "Self-calibration for language model
quantization and pruning", 2024). The user's text still chooses the prompts, so the topic stays theirs.
The price is that text's own domain: SST-2 dev perplexity went from 131 to 171, so a model meant only for
text like the calibration file's is better calibrated on it (``calib_source: data``).

Sampling is plain ancestral sampling (temperature 1, no top-k/top-p: the model's own distribution),
seeded and independent of the global RNG, and runs where the model is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["sampled_windows"]


def _rows(batch: Any) -> list[torch.Tensor]:
    """The batch's rows as token tensors, without their padding."""
    mask = None
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        ids = batch
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2):
        raise TypeError("calibration batches must be input-id tensors or tokenizer dicts with input_ids")
    ids = ids if ids.dim() == 2 else ids[None]
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] != ids.shape[-1]:
        return list(ids)
    mask = mask if mask.dim() == 2 else mask[None]
    return [row[m.bool()] for row, m in zip(ids, mask)]


def sampled_windows(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    prompt_tokens: int = 8,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[list[torch.Tensor], int]:
    """One ``[1, n]`` window per calibration row (``n`` its length without padding): the row's first
    ``prompt_tokens`` tokens, then the model's sampled continuation to ``n`` tokens; and how many rows
    were no longer than the prompt (nothing to sample: they are returned as given).

    Raises ``ValueError`` for a model that cannot generate.
    """
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise ValueError(
            f"calibration sampled from the model needs a language model with generate() (a *ForCausalLM); "
            f"{type(model).__name__} has none: use calib_source 'data'"
        )
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be positive, got {prompt_tokens}")
    rows = [ids.long() for b in batches for ids in _rows(b)]
    device = next(model.parameters()).device
    pad = getattr(model.config, "eos_token_id", None)
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    out = [ids[None].clone() for ids in rows]  # rows too short to continue stay as given
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(rows):
        if ids.numel() > prompt_tokens:
            by_length.setdefault(ids.numel(), []).append(i)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for n, idx in sorted(by_length.items()):
                new = n - prompt_tokens
                for start in range(0, len(idx), batch_size):
                    part = idx[start : start + batch_size]
                    p = torch.stack([rows[i][:prompt_tokens] for i in part]).to(device)
                    seqs = model.generate(
                        p, attention_mask=torch.ones_like(p), do_sample=True, temperature=1.0, top_k=0,
                        top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad,
                    )  # fmt: skip
                    for i, seq in zip(part, seqs):
                        out[i] = seq[None, :n].cpu()
    finally:
        model.train(was_training)
    return out, len(rows) - sum(len(idx) for idx in by_length.values())
