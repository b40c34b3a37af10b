from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from flashsvd.methods import (
    LayerStatistics,
    StatisticsCollector,
    calibrate_blockwise,
    collect_fisher,
    collect_statistics,
    factorize,
)


def test_gram_accumulation_matches(gen):
    lin = nn.Linear(7, 5)
    xs = [torch.randn(3, 4, 7, generator=gen) for _ in range(3)]
    st = collect_statistics({"l": lin}, lin, xs)["l"]
    x = torch.cat([a.reshape(-1, 7) for a in xs]).double()
    assert st.gram.dtype == torch.float64
    assert torch.allclose(st.gram, x.T @ x, rtol=1e-12, atol=1e-10)
    assert st.n_tokens == 36
    assert torch.allclose(st.abs_mean, x.abs().mean(0))
    assert torch.allclose(st.abs_max, x.abs().amax(0))


def test_fisher_collection(gen):
    lin = nn.Linear(6, 4)
    xs = [torch.randn(5, 6, generator=gen) for _ in range(2)]
    st = collect_fisher({"l": lin}, lambda x: lin(x).square().sum(), xs, output_grads=True)["l"]
    expect = torch.zeros(4, 6, dtype=torch.float64)
    for x in xs:
        g = (2 * lin(x)).detach().T @ x  # dL/dW
        expect += g.double().square()
    assert torch.allclose(st.fisher_in, expect.sum(0), rtol=1e-5)
    assert torch.allclose(st.fisher_out, expect.sum(1), rtol=1e-5)
    assert st.grad_out_sq.shape == (4,) and st.n_grad_tokens == 10
    assert lin.weight.grad is None


def test_collector_custom_input_of(gen):
    class Conv1DLike(nn.Module):  # GPT-2 style: weight [in, out], input as kwarg-free first arg
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 3))

        def forward(self, x):
            return x @ self.weight

    m = Conv1DLike()
    x = torch.randn(4, 6, generator=gen)
    with torch.no_grad(), StatisticsCollector({"c": m}) as col:
        m(x)
    assert torch.allclose(col.stats["c"].gram, x.double().T @ x.double())


class Block(nn.Module):
    def __init__(self, d, gen):
        super().__init__()
        self.a = nn.Linear(d, 2 * d)
        self.b = nn.Linear(2 * d, d)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


def _setup(gen):
    blocks = [Block(8, gen) for _ in range(3)]
    inputs = [torch.randn(4, 8, generator=gen) for _ in range(3)]
    return blocks, inputs


def _run(blocks, inputs, mode, paired=False, grouped=False):
    seen = {}

    def targets(i, blk):
        g = [{f"{i}.a": blk.a}, {f"{i}.b": blk.b}]
        return g if grouped else {**g[0], **g[1]}

    def compress(i, stats):
        for name, st in stats.items():
            seen[name] = copy.deepcopy(st)
            mod = blocks[i].a if name.endswith(".a") else blocks[i].b
            f = factorize(mod.weight.data, 3, "whiten", stats=st)
            mod.weight.data.copy_(f.merged_weight())

    calibrate_blockwise(blocks, inputs, lambda b, x: b(x), targets, compress, mode=mode, paired=paired)
    return seen


def test_sequential_and_all_at_once_agree_on_first_block(gen):
    blocks, inputs = _setup(gen)
    s_seq = _run(copy.deepcopy(blocks), inputs, "sequential")
    s_all = _run(copy.deepcopy(blocks), inputs, "all_at_once")
    assert torch.allclose(s_seq["0.a"].gram, s_all["0.a"].gram)
    assert torch.allclose(s_seq["0.b"].gram, s_all["0.b"].gram)  # one group: b sees dense a in both
    assert not torch.allclose(s_seq["1.a"].gram, s_all["1.a"].gram)  # later blocks see compressed inputs
    # all-at-once equals hooking the whole dense model at once
    dense = copy.deepcopy(blocks)
    mods = {f"{i}.{n}": getattr(b, n) for i, b in enumerate(dense) for n in "ab"}

    def run_all(x):
        for b in dense:
            x = b(x)

    ref = collect_statistics(mods, run_all, inputs)
    for name in mods:
        assert torch.allclose(ref[name].gram, s_all[name].gram)


def test_paired_cross_stats_and_groups(gen):
    blocks, inputs = _setup(gen)
    s = _run(copy.deepcopy(blocks), inputs, "sequential", paired=True, grouped=True)
    # first layer of first block: actual inputs = dense inputs → cross == gram
    assert torch.allclose(s["0.a"].cross, s["0.a"].gram)
    # within a block, group b sees the compressed a: differs from dense
    assert not torch.allclose(s["0.b"].cross, s["0.b"].gram)
    assert isinstance(s["2.b"], LayerStatistics)


@pytest.mark.parametrize("empty", [[], [{}]])
def test_paired_sequential_passes_a_block_with_nothing_to_compress(gen, empty):
    """A middle block without targets (kept dense by the allocation) still advances the dense stream:
    the next block's cross statistics are against the dense model's inputs (it once failed with an
    IndexError: SmolLM2 at keep 0.8, loss-curve allocation, sequential)."""
    blocks, inputs = _setup(gen)
    dense = copy.deepcopy(blocks)
    seen = {}

    def targets(i, blk):
        return empty if i == 1 else {f"{i}.a": blk.a}

    def compress(i, stats):
        seen.update(stats)
        if not stats:  # the empty group
            return
        f = factorize(blocks[i].a.weight.data, 3, "whiten", stats=stats[f"{i}.a"])
        blocks[i].a.weight.data.copy_(f.merged_weight())

    calibrate_blockwise(blocks, inputs, lambda b, x: b(x), targets, compress, mode="sequential", paired=True)
    assert sorted(seen) == ["0.a", "2.a"]
    with torch.no_grad():
        x_dense = torch.cat([dense[1](dense[0](x)) for x in inputs]).double()
        x_actual = torch.cat([blocks[1](blocks[0](x)) for x in inputs]).double()
    assert torch.allclose(seen["2.a"].cross, x_actual.T @ x_dense)


def test_blockwise_in_place_advances_the_given_list():
    """``in_place=True``: the caller's list ends as the last block's outputs (first inputs freed early)."""
    from flashsvd.methods import calibrate_blockwise

    torch.manual_seed(0)
    blocks = [nn.Linear(4, 4) for _ in range(2)]
    inputs = [torch.randn(3, 4) for _ in range(2)]
    keep = [x.clone() for x in inputs]
    results_copy = calibrate_blockwise(blocks, list(inputs), lambda b, x: b(x), lambda i, b: {f"{i}": b},
                                       lambda i, st: sorted(st), mode="all_at_once")  # fmt: skip
    calibrate_blockwise(blocks, inputs, lambda b, x: b(x), lambda i, b: {f"{i}": b}, lambda i, st: sorted(st),
                        mode="all_at_once", in_place=True)  # fmt: skip
    with torch.no_grad():
        expected = [blocks[1](blocks[0](x)) for x in keep]
    assert all(torch.allclose(a, b) for a, b in zip(inputs, expected))
    assert results_copy == [["0"], ["1"]]


@pytest.mark.parametrize("mode", ["sequential", "all_at_once"])
def test_replaced_modules_are_released_before_the_next_group(gen, mode):
    """A group's modules, once ``compress`` swapped them out, are not kept alive by the block loop (their
    dense weights would otherwise sit on the accelerator beside the next group's statistics)."""
    blocks, inputs = _setup(gen)
    alive = []

    def targets(i, blk):
        return [{f"{i}.a": blk.a}, {f"{i}.b": blk.b}]

    def compress(i, stats):
        (name,) = stats
        if name.endswith(".a"):
            old = blocks[i].a
            blocks[i].a = nn.Linear(old.in_features, old.out_features)
            alive.append(weakref.ref(old))
            del old
        else:
            gc.collect()
            assert alive[-1]() is None, "the replaced module of the previous group is still referenced"

    calibrate_blockwise(blocks, inputs, lambda b, x: b(x), targets, compress, mode=mode)
    assert len(alive) == 3
