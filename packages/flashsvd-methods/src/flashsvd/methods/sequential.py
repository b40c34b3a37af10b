"""Block-by-block calibration and compression with bounded memory.

Only one block's statistics exist at a time: calibrate block ``i``, let the caller factorize it, free
its statistics, then move the cached hidden states one block forward.

* ``mode="sequential"`` moves forward through the *compressed* block, so block ``i+1`` is calibrated on
  the inputs it will really see (errors of earlier layers are visible to later ones).
* ``mode="all_at_once"`` moves forward through the *dense* block (statistics of the dense model — what
  hooking every layer in one pass over the dense model gives — still one block at a time in memory).
* ``paired=True`` (sequential only) additionally keeps the dense model's hidden states and records,
  for every target layer, ``cross = X̃ᵀ X_ref`` between its actual inputs ``X̃`` and the dense model's
  ``X_ref`` for the same tokens, so methods can aim at the dense outputs (whiten, svdllm's update).

The model-specific parts are callables: ``run_block(block, inp) -> next_inp`` runs one block on one
cached batch (``inp`` can be any object, e.g. a tuple of hidden states and attention arguments) and
``targets(i, block)`` returns the layers to hook, either one mapping ``{name: module}`` or an ordered
list of mappings (groups) — each group is calibrated after the previous groups of the same block were
compressed (e.g. ``[qkv, o, up/gate, down]``), which makes sequential mode sequential within a block too.

Big models (llm-compressor's sequential pipeline): ``place(block, True/False)`` moves each block onto
the accelerator just before its turn and back afterwards, so one block's weights sit on the device at
a time; ``done(i, inputs, reference_inputs)`` sees the cached inputs of block ``i + 1`` after block
``i`` is finished (to checkpoint them), and ``start`` / ``reference_inputs`` resume from there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from flashsvd.methods.calibration import InputOf, LayerStatistics, StatisticsCollector, default_input_of
from flashsvd.methods.errors import FlashSVDMethodError

Targets = Mapping[str, nn.Module] | Sequence[Mapping[str, nn.Module]]


def _groups(t: Targets) -> list[dict[str, nn.Module]]:
    if isinstance(t, Mapping):
        return [dict(t)]
    return [dict(g) for g in t]


def calibrate_blockwise(
    blocks: Sequence[nn.Module],
    inputs: list[Any],
    run_block: Callable[[nn.Module, Any], Any],
    targets: Callable[[int, nn.Module], Targets],
    compress: Callable[[int, dict[str, LayerStatistics]], Any],
    *,
    mode: str = "sequential",
    paired: bool = False,
    scales: bool = True,
    input_of: InputOf = default_input_of,
    progress: Callable[[int], None] | None = None,
    start: int = 0,
    reference_inputs: list[Any] | None = None,
    place: Callable[[nn.Module, bool], None] | None = None,
    done: Callable[[int, list[Any], list[Any] | None], None] | None = None,
    in_place: bool = False,
) -> list[Any]:
    """Calibrate and compress ``blocks`` in order; returns what ``compress`` returned, per group.

    Args:
        blocks: ordered blocks (e.g. transformer layers).
        inputs: cached inputs of ``blocks[0]``, one entry per calibration batch. The list is not modified.
        run_block: ``run_block(block, inp)`` → the input of the next block.
        targets: ``targets(i, block)`` → ``{name: module}`` or a list of such groups.
        compress: ``compress(i, stats)`` factorizes the layers named in ``stats`` in place (the
            statistics are freed right after it returns).
        mode: ``"sequential"`` or ``"all_at_once"``.
        paired: record ``cross`` statistics against the dense model (``mode="sequential"`` only).
        start: index of the first block to process; ``inputs`` are then the cached inputs of
            ``blocks[start]`` (and ``reference_inputs`` the dense model's, when ``paired``).
        place: ``place(block, True)`` before a block is processed, ``place(block, False)`` after.
        done: ``done(i, next_inputs, next_reference_inputs)`` after block ``i`` is finished.
        in_place: advance ``inputs`` itself (each entry replaced by the next block's input as soon as
            it is computed), so only one batch beyond one copy of the activations is alive; otherwise
            ``inputs`` is left as it was and the first block's inputs stay alive throughout.
    """
    if mode not in ("sequential", "all_at_once"):
        raise FlashSVDMethodError(f"mode must be 'sequential' or 'all_at_once', got {mode!r}.")
    if paired and mode != "sequential":
        raise FlashSVDMethodError("paired=True only makes sense with mode='sequential'.")
    if not inputs:
        raise FlashSVDMethodError("no cached calibration inputs: pass at least one batch for block 0.")
    current = inputs if in_place else list(inputs)
    dense_stream = (
        (list(reference_inputs) if reference_inputs is not None else list(inputs)) if paired else None
    )
    results: list[Any] = []
    with torch.no_grad():
        for i, block in enumerate(blocks):
            if i < start:
                continue
            if place is not None:
                place(block, True)
            groups = _groups(targets(i, block))
            if mode == "all_at_once":
                stats: dict[str, LayerStatistics] = {}
                everything = {name: m for g in groups for name, m in g.items()}
                with StatisticsCollector(everything, scales=scales, input_of=input_of, stats=stats):
                    outs = [run_block(block, inp) for inp in current]
                del everything
                for gi, group in enumerate(groups):
                    results.append(compress(i, {name: stats.pop(name) for name in group if name in stats}))
                    groups[gi] = group = {}  # see the sequential branch
                current[:] = outs
            else:
                reference = copy.deepcopy(block) if paired else None
                ref_groups = _groups(targets(i, reference)) if paired else None
                dense_next: list[Any] = []
                for gi, group in enumerate(groups):
                    stats = {}
                    for j, inp in enumerate(current):
                        ref_inputs = None
                        if paired:
                            with StatisticsCollector(
                                ref_groups[gi], gram=False, scales=False, record=True, input_of=input_of
                            ) as rec:
                                y = run_block(reference, dense_stream[j])
                            if gi == 0:
                                dense_next.append(y)
                            ref_inputs = rec.last_inputs
                        with StatisticsCollector(
                            group, scales=scales, reference=ref_inputs, input_of=input_of, stats=stats
                        ):
                            run_block(block, inp)
                    results.append(compress(i, stats))
                    del stats
                    # drop this group's modules: ``compress`` replaced them, and holding them until the
                    # block ends keeps their dense weights on the device beside the next groups' work
                    groups[gi] = group = {}
                if paired and len(dense_next) != len(dense_stream):
                    # no group ran the dense copy (nothing to compress in this block, e.g. a block the
                    # allocation kept dense): the next block still needs the dense model's inputs
                    dense_next = [run_block(reference, x) for x in dense_stream]
                del reference
                for j, inp in enumerate(current):
                    current[j] = run_block(block, inp)
                if paired:
                    dense_stream = dense_next
            if place is not None:
                place(block, False)
            if done is not None:
                done(i, current, dense_stream)
            if progress is not None:
                progress(i)
    return results
