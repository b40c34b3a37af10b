"""Figures for the Compress, Compare and Fine-tune tabs (matplotlib, from result rows and checkpoints)."""

from __future__ import annotations

from typing import Any


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def loss_curve(points: list[tuple[int, float]]):
    fig, ax = _figure("training loss")
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    return fig


def metric_vs_keep_ratio(results: list[dict[str, Any]]):
    """The task metric against keep_ratio, one line per method (dense drawn at keep_ratio 1)."""
    fig, ax = _figure("quality vs keep ratio")
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in results:
        facts, metric = r.get("model", {}), r.get("main_metric")
        value = r.get("metrics", {}).get(metric)
        if value is None:
            continue
        key = (f"{r.get('task')}:{metric}", facts.get("method") or "dense")
        series.setdefault(key, []).append((facts.get("keep_ratio") or 1.0, value))
    for (task_metric, method), pts in sorted(series.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=f"{method} ({task_metric})")
    ax.set_xlabel("keep_ratio (fraction of parameters kept)")
    ax.set_ylabel("metric")
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def memory_latency_bars(results: list[dict[str, Any]]):
    """Peak/transient memory and latency per evaluated model and backend (dense vs low-rank vs FlashSVD)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=100)
    labels, peak, transient, latency = [], [], [], []
    for r in results:
        mem = r.get("memory_latency", {})
        labels.append(f"{r.get('model', {}).get('name', '?')}\n{r.get('backend')}")
        peak.append((mem.get("peak_bytes") or 0) / 2**20)
        transient.append((mem.get("transient_bytes") or 0) / 2**20)
        latency.append(mem.get("latency_ms") or 0)
    for ax, values, title in zip(
        axes, (peak, transient, latency), ("peak MiB", "transient MiB", "latency ms")
    ):
        ax.bar(range(len(values)), values)
        ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def rank_chart(rows: list[dict[str, Any]]):
    """Kept rank per layer as a fraction of its full rank (layers kept dense drawn at 1, in grey)."""
    fig, ax = _figure("rank per layer (fraction of full rank)")
    if rows:
        fig.set_size_inches(max(6.4, 0.14 * len(rows)), 3.8)
        x = range(len(rows))
        frac = [1.0 if r["rank"] is None else r["rank"] / r["full"] for r in rows]
        colors = ["0.75" if r["rank"] is None else "C0" for r in rows]
        ax.bar(x, frac, color=colors)
        ax.set_xticks(x, [r["layer"] for r in rows], fontsize=6, rotation=90)
        ax.set_ylim(0, 1.05)
    ax.set_ylabel("rank / full rank")
    fig.tight_layout()
    return fig


def spectrum_plot(values, rank: int | None, title: str):
    """Singular values of a dense weight (log scale) with the kept rank marked."""
    fig, ax = _figure(title)
    ax.semilogy(range(1, len(values) + 1), values)
    if rank is not None:
        ax.axvline(rank, color="C3", ls="--", label=f"kept rank {rank}")
        ax.legend(fontsize=8)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    fig.tight_layout()
    return fig
