"""bench on tiny shapes writes a table, a CSV with a fixed schema, and a PNG."""

import csv

from flashsvd.app.commands.bench import COLUMNS


def test_bench_tiny(cli, tiny_bert, tmp_path):
    res = cli("bench", "--model", tiny_bert, "--batch-sizes", "1,2", "--seq-lens", "8", "--repeats", "1",
              "--warmup", "0", "--keep-ratio", "0.5", "--device", "cpu", "--output-dir", tmp_path)  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert list(rows[0]) == COLUMNS
    assert {r["variant"] for r in rows} == {"dense", "torch", "flash"} and len(rows) == 6
    dense = next(r for r in rows if r["variant"] == "dense")
    low = next(r for r in rows if r["variant"] == "torch")
    assert int(low["persistent_bytes"]) < int(dense["persistent_bytes"])
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_rejects_bad_shapes(cli, tiny_bert, tmp_path):
    res = cli("bench", "--model", tiny_bert, "--seq-lens", "8,x", "--output-dir", tmp_path)
    assert res.exit_code == 2 and "comma-separated integers" in res.stderr
