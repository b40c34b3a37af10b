"""Data-parallel calibration is exact: 2 gloo processes on shards == 1 process on the union, bit for bit.

Each multi-process test starts one OS process per rank with the environment ``torchrun`` would give it
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free localhost port) and
runs this file as a script (``python test_distributed.py SCENARIO OUT``): spawned children cannot import
a test module that pytest loaded with ``--import-mode=importlib``. The single-process reference is
launched the same way with a world of 1 (same threads, same kernels), so results must be identical.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from flashsvd.methods import (
    LayerShape,
    LayerStatistics,
    ars_select_ranks,
    collect_fisher,
    collect_statistics,
    factorize,
    layer_spectrum,
    loss_curve,
)
from flashsvd.methods.distributed import (
    DistributedError,
    all_reduce_statistics,
    assign,
    calibrate_blockwise_distributed,
    distributed_statistics,
    get_rank,
    get_world_size,
    init_from_env,
    is_main_process,
    shard,
    spread,
)

WORLD = 2
TIMEOUT_S = 20.0

# ---- the shared computation (run by 1 process and by each of 2 ranks) --------------------------------


def _data(n_batches: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, 12, dtype=torch.float64)
    return [
        (
            torch.randn(2 + i % 3, 3, 12, generator=g, dtype=torch.float64) * scale + 0.3,
            torch.randn(2 + i % 3, 3, 6, generator=g, dtype=torch.float64),
        )
        for i in range(n_batches)
    ]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 6)
    ).double()


#: name → (rank, n_heads)
LAYERS = {"0": (2, 4), "2": (4, None), "4": (3, None)}
#: (method, options) combinations factorized from the reduced statistics
CASES = {
    "whiten": ("whiten", {}),
    "whiten_centered": ("whiten", {"center": True}),
    "svdllm": ("svdllm", {"update": "v"}),
    "asvd_mean": ("asvd", {"scale": "mean"}),
    "asvd_max": ("asvd", {"scale": "max"}),
    "fwsvd": ("fwsvd", {}),
    "ars": ("ars", {}),
}


def compute_methods() -> dict[str, torch.Tensor]:
    """Statistics, every data-aware method's factors, loss curves and ARS ranks, as a flat dict."""
    model = _mlp()
    mods = {name: model[int(name)] for name in LAYERS}

    def collect(batches):
        stats = collect_statistics(mods, lambda b: model(b[0]), batches)
        loss = lambda b: (model(b[0]) - b[1]).square().mean()  # noqa: E731
        return collect_fisher(mods, loss, batches, output_grads=True, stats=stats)

    stats = distributed_statistics(collect, _data())
    out: dict[str, torch.Tensor] = {}
    for name, st in stats.items():
        for field in (*st.sums, "abs_max", "n_tokens", "n_grad_batches", "n_grad_tokens"):
            value = getattr(st, field)
            out[f"stats.{name}.{field}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)

    def factor(key: str):
        case, name = key.split(":")
        method, options = CASES[case]
        rank, heads = LAYERS[name]
        lin = mods[name]
        return factorize(lin.weight.detach(), rank, method, stats=stats[name], bias=lin.bias.detach(),
                         n_heads=heads, **options)  # fmt: skip

    keys = [f"{case}:{name}" for case in CASES for name in LAYERS]
    factors = spread(keys, factor, cost=lambda k: mods[k.split(":")[1]].weight.numel())
    for key, f in factors.items():
        out[f"merged.{key}"] = f.merged_weight()
        out[f"bias.{key}"] = f.bias
        out[f"u.{key}"], out[f"v.{key}"] = f.u, f.v
    shapes = []
    for name, (_, heads) in LAYERS.items():
        w = mods[name].weight.detach()
        out[f"curve.{name}"] = loss_curve(w, stats[name], heads)
        shapes.append(LayerShape(name, w.shape[1], w.shape[0], heads, "ffn"))
    spectra = {s.name: layer_spectrum(mods[s.name].weight.detach(), stats[s.name], s.n_heads) for s in shapes}
    ars = ars_select_ranks(shapes, spectra, 0.5, steps=40, hidden=8)
    for name, r in ars.allocation.ranks.items():
        out[f"ars_rank.{name}"] = torch.tensor(-1 if r is None else r)
    return out


class Block(nn.Module):
    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def compute_sequential() -> dict[str, torch.Tensor]:
    """Block-by-block (sequential, paired) whitening of a 3-block residual model; final weights."""
    torch.manual_seed(1)
    blocks = nn.ModuleList([Block() for _ in range(3)]).double()
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(1 + i % 2, 4, 8, generator=g, dtype=torch.float64) for i in range(5)]

    def compress(i: int, stats: dict[str, LayerStatistics]):
        def fit(name: str):
            lin = getattr(blocks[i], name)
            return factorize(lin.weight.detach(), 3, "whiten", stats=stats[name], bias=lin.bias.detach())

        factors = spread(sorted(stats), fit)
        for name, f in factors.items():
            lin = getattr(blocks[i], name)
            lin.weight.data.copy_(f.merged_weight())
            lin.bias.data.copy_(f.bias)
        return {name: int(st.n_tokens) for name, st in stats.items()}

    counts = calibrate_blockwise_distributed(
        blocks,
        shard(inputs),
        lambda block, x: block(x),
        lambda i, block: [{"fc1": block.fc1}, {"fc2": block.fc2}],
        compress,
        mode="sequential",
        paired=True,
    )
    out = {f"w.{k}": v.detach() for k, v in blocks.state_dict().items()}
    out["tokens"] = torch.tensor([n for c in counts for n in c.values()])
    return out


@dataclasses.dataclass
class Projected:
    """A statistic in a basis every rank shares (declared ``reduce="same"``) plus a sum."""

    basis: torch.Tensor = dataclasses.field(metadata={"reduce": "same"})
    energy: torch.Tensor | None = None


def compute_union() -> dict[str, torch.Tensor]:
    """Ranks hold different layers (one shard never reached layer b): the result is the union.

    Also: a rank with nothing (``None``), tensors larger than a bucket, a failing factorization on one
    rank, and ``main_process_first``.
    """
    from flashsvd.methods import distributed
    from flashsvd.methods.distributed import reduce

    reduce.BUCKET_BYTES = 64  # the 3×3 float64 Gram (72 bytes) takes the one-tensor path
    me = get_rank()
    stats = {"a": LayerStatistics(3)}
    stats["a"].update(torch.full((2, 3), float(me + 1), dtype=torch.float64))
    if me == 1:
        stats["b"] = LayerStatistics(2)
        stats["b"].update(torch.tensor([[-1.0, 2.0]], dtype=torch.float64))
    reduced = all_reduce_statistics(stats)
    out = {"a.gram": reduced["a"].gram, "a.n": torch.tensor(reduced["a"].n_tokens)}
    out["a.abs_max"], out["b.abs_max"] = reduced["a"].abs_max, reduced["b"].abs_max
    out["b.gram"], out["b.n"] = reduced["b"].gram, torch.tensor(reduced["b"].n_tokens)
    try:
        all_reduce_statistics({"x_mean": torch.ones(2)})
    except DistributedError as err:
        out["mean_refused"] = torch.tensor("mean" in str(err))
    nothing = all_reduce_statistics(None if me == 0 else {"c": {"n_rows": 3, "total_sum": torch.ones(2)}})
    out["c.n_rows"], out["c.total_sum"] = torch.tensor(nothing["c"]["n_rows"]), nothing["c"]["total_sum"]

    def fails_on_b(name: str) -> torch.Tensor:
        if name == "b":
            raise ValueError("singular statistics")
        return torch.ones(1)

    try:
        spread(["a", "b"], fails_on_b)
    except DistributedError as err:
        out["spread_failed"] = torch.tensor("'b'" in str(err) and "singular statistics" in str(err))
    same = all_reduce_statistics(Projected(torch.eye(2), torch.ones(2) * (me + 1)))
    out["same.basis"], out["same.energy"] = same.basis, same.energy
    try:
        all_reduce_statistics(Projected(torch.eye(2) * (me + 1)))
    except DistributedError as err:
        out["same_refused"] = torch.tensor("differs between ranks" in str(err))
    out["traffic"] = torch.tensor(distributed.Traffic.reduced_bytes)
    out["from_main"] = torch.tensor(distributed.broadcast_from_main({"rank": me})["rank"])
    try:
        spread(["a", "b"] if me == 0 else ["a", "c"], lambda n: n)
    except DistributedError as err:
        out["names_refused"] = torch.tensor("different matrices" in str(err))
    order = []
    with distributed.main_process_first():
        order.append(time.monotonic())
    out["first_done"] = torch.tensor(order, dtype=torch.float64)
    return out


def killed() -> dict[str, torch.Tensor]:
    """Rank 1 dies before the all-reduce; rank 0 must fail with a clear error, not hang."""
    if get_rank() == 1:
        os._exit(7)
    time.sleep(0.5)
    return compute_methods()


def stuck() -> dict[str, torch.Tensor]:
    """Rank 1 hangs (alive, never joins the all-reduce); rank 0 must give up after the timeout."""
    if get_rank() == 1:
        time.sleep(300)
    return compute_methods()


SCENARIOS = {
    "methods": compute_methods,
    "sequential": compute_sequential,
    "union": compute_union,
    "killed": killed,
    "stuck": stuck,
}


def _main(scenario: str, out_dir: str) -> None:
    """Entry point of one rank (run as a script with torchrun's environment)."""
    init_from_env()
    assert get_world_size() == int(os.environ["WORLD_SIZE"])
    try:
        result = SCENARIOS[scenario]()
    except DistributedError as err:
        Path(out_dir, f"error{get_rank()}.txt").write_text(str(err))
        sys.exit(1)
    torch.save(result, Path(out_dir, f"rank{get_rank()}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- launching ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    scenario: str, out: Path, timeout_s: float = TIMEOUT_S, until_rank0: bool = False, world: int = WORLD
) -> tuple[list[int | None], float]:
    """Start the ranks, wait for all of them (``until_rank0``: for rank 0 only), kill any still running."""
    port = _free_port()
    procs = []
    t0 = time.monotonic()
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FLASHSVD_DIST_TIMEOUT=str(timeout_s),
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   MKL_CBWR="COMPATIBLE")  # MKL: results independent of buffer alignment  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(out)], env=env))
    waited = procs[:1] if until_rank0 else procs
    while time.monotonic() < t0 + timeout_s + 60 and any(p.poll() is None for p in waited):
        time.sleep(0.1)
    seconds = time.monotonic() - t0
    codes = [p.poll() for p in procs]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return codes, seconds


def _ranks(scenario: str, tmp_path: Path, world: int = WORLD) -> list[dict[str, torch.Tensor]]:
    tmp_path.mkdir(exist_ok=True)
    codes, _ = _launch(scenario, tmp_path, world=world)
    assert codes == [0] * world, codes
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _assert_same(dist: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Bit for bit: every statistic is an order-independent sum, so sharding must change nothing."""
    assert dist.keys() == ref.keys()
    for key, want in ref.items():
        got = dist[key]
        assert torch.equal(got, want), (key, float((got.double() - want.double()).abs().max()))


@pytest.fixture(scope="module")
def methods_runs(tmp_path_factory):
    two = _ranks("methods", tmp_path_factory.mktemp("methods"))
    (one,) = _ranks("methods", tmp_path_factory.mktemp("methods_one"), world=1)
    return two, one


@pytest.mark.parametrize("case", [*CASES, "stats", "curve", "ars_rank"])
def test_two_ranks_equal_one_process(methods_runs, case):
    """Statistics, factors of every data-aware method, loss curves and ARS ranks match the union."""
    (r0, r1), ref = methods_runs
    if case in CASES:  # u and v are only defined up to signs: compare the merged weights and biases
        keys = [k for k in ref if k.startswith((f"merged.{case}:", f"bias.{case}:"))]
    else:
        keys = [k for k in ref if k.startswith(f"{case}.")]
    assert keys
    _assert_same({k: r0[k] for k in keys}, {k: ref[k] for k in keys})
    for k in r0:  # every rank holds the same factors, bit for bit (broadcast from their owner)
        assert torch.equal(r0[k], r1[k]), k


def test_sequential_calibration_two_ranks_equal_one_process(tmp_path):
    r0, r1 = _ranks("sequential", tmp_path / "two")
    (ref,) = _ranks("sequential", tmp_path / "one", world=1)
    _assert_same(r0, ref)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_all_reduce_takes_the_union_refuses_means_and_spreads_failures(tmp_path):
    r0, r1 = _ranks("union", tmp_path)
    for r in (r0, r1):
        assert torch.equal(r["a.gram"], torch.full((3, 3), 2 * 1.0 + 2 * 4.0, dtype=torch.float64))
        assert int(r["a.n"]) == 4 and int(r["b.n"]) == 1
        assert torch.equal(r["a.abs_max"], torch.full((3,), 2.0, dtype=torch.float64))
        assert torch.equal(r["b.abs_max"], torch.tensor([1.0, 2.0], dtype=torch.float64))
        assert torch.equal(r["b.gram"], torch.tensor([[1.0, -2.0], [-2.0, 4.0]], dtype=torch.float64))
        assert bool(r["mean_refused"])
        assert int(r["c.n_rows"]) == 3 and torch.equal(r["c.total_sum"], torch.ones(2))
        assert bool(r["spread_failed"])  # both ranks raise, naming the matrix and the cause
        assert torch.equal(r["same.basis"], torch.eye(2)) and torch.equal(
            r["same.energy"], torch.full((2,), 3.0)
        )
        assert bool(r["same_refused"])
        assert int(r["traffic"]) > 0
        assert int(r["from_main"]) == 0 and bool(r["names_refused"])
    assert float(r0["first_done"]) <= float(r1["first_done"])  # rank 0 ran the body first


def test_killed_rank_makes_the_other_fail_clearly(tmp_path):
    codes, seconds = _launch("killed", tmp_path)
    assert codes[1] == 7
    assert codes[0] != 0
    assert seconds < TIMEOUT_S + 30
    message = (tmp_path / "error0.txt").read_text()
    assert "rank 0 of 2" in message and "died or timed out" in message


def test_hanging_rank_makes_the_other_fail_after_the_timeout(tmp_path):
    codes, seconds = _launch("stuck", tmp_path, timeout_s=5.0, until_rank0=True)
    assert seconds < 5.0 + 30
    assert codes[0] not in (0, None)  # rank 0 gave up (rank 1 was still asleep and got killed)
    message = (tmp_path / "error0.txt").read_text()
    assert "rank 0 of 2" in message and "died or timed out" in message


# ---- single process: everything is the identity ---------------------------------------------------------


@pytest.mark.parametrize("n, world", [(0, 1), (5, 1), (5, 2), (7, 3), (2, 4)])
def test_shard_covers_every_item_once(n, world):
    items = list(range(n))
    parts = [shard(items, r, world) for r in range(world)]
    assert sorted(x for p in parts for x in p) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_assign_balances_costs():
    costs = [8, 7, 6, 5, 4, 3, 2, 1]
    owner = assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert loads == [18, 18]
    assert assign(costs, 2) == owner  # deterministic


def test_without_process_group_everything_is_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is False
    assert is_main_process() and get_world_size() == 1
    stats = {"a": LayerStatistics(2)}
    assert all_reduce_statistics(stats) is stats
    seen = []
    assert distributed_statistics(lambda b: seen.extend(b) or "done", [1, 2, 3]) == "done"
    assert seen == [1, 2, 3]
    assert spread(["x", "y"], str.upper) == {"x": "X", "y": "Y"}


def test_incomplete_launcher_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(DistributedError, match="torchrun"):
        init_from_env()


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
