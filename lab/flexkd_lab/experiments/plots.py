"""PNG plots: learning curves per loss term, and the study's mean ± std bars."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flexkd._io import atomic_path

LOSS_TERMS = ("task", "logit", "feature", "total")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        _pyplot().close(fig)
    return Path(path)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, running = [], 0.0
    for i, value in enumerate(values):
        running += value
        if i >= window:
            running -= values[i - window]
        out.append(running / min(i + 1, window))
    return out


def plot_learning_curves(
    curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """One panel per loss term, one line per method; ``curves[label]`` is that run's per-step metric records."""
    if not curves:
        raise ValueError("curves: need at least one run")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(LOSS_TERMS), figsize=(4.2 * len(LOSS_TERMS), 3.4))
    for ax, term in zip(axes, LOSS_TERMS, strict=True):
        drawn = False
        for label, records in curves.items():
            steps = [r["step"] for r in records if term in r]
            values = [float(r[term]) for r in records if term in r]
            if not values or not any(values):
                continue  # a term this method does not use
            window = max(1, len(values) // 20)
            ax.plot(steps, smooth(values, window), label=label, lw=1.3)
            drawn = True
        ax.set_title(f"{term} loss")
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not used", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_mean_std_bars(
    panels: Sequence[tuple[str, Sequence[Mapping[str, Any]], str]],
    path: str | os.PathLike,
    *,
    error: str = "std",
) -> Path:
    """One bar panel per ``(title, summary rows, metric)``: bars at ``<metric>_mean``, error bars
    ``<metric>_<error>`` (the std, or ``"ci"``: a confidence interval's half-width)."""
    if not panels:
        raise ValueError("panels: need at least one panel")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (title, rows, metric) in zip(axes[0], panels, strict=True):
        rows = [r for r in rows if f"{metric}_mean" in r]
        labels = [r.get("label", r["method"]) for r in rows]
        means = [r[f"{metric}_mean"] for r in rows]
        stds = [r[f"{metric}_{error}"] for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(title, fontsize=10)
        if means:
            low = min(m - s for m, s in zip(means, stds, strict=True))
            high = max(m + s for m, s in zip(means, stds, strict=True))
            pad = max(0.02, 0.15 * (high - low))
            ax.set_ylim(max(0.0, low - pad), high + pad)
    fig.tight_layout()
    return _save(fig, path)


def plot_teacher_check(
    panels: Sequence[tuple[str, Sequence[Mapping[str, Any]], float, str]], path: str | os.PathLike
) -> Path:
    """One panel per ``(task, rows, intact value, metric)``: the metric against the layer whose dims were
    zeroed, one line per condition (``rows`` from ``flexkd_lab.experiments.study.teacher_check_table``)."""
    if not panels:
        raise ValueError("panels: need at least one panel")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    for ax, (task, rows, intact, metric) in zip(axes[0], panels, strict=True):
        layers = [int(str(r["layer"]).split()[0]) for r in rows]
        for key, label in (
            ("top", "zero top-k"),
            ("random", "zero random k"),
            ("bottom", "zero bottom-k"),
            ("lowest", "zero lowest half"),
        ):
            if all(key in r for r in rows):  # bottom-k is the lowest half when k = width / 2
                ax.plot(layers, [r[key] for r in rows], marker="o", label=label)
        ax.axhline(intact, color="gray", ls="--", lw=1, label="intact")
        ax.set_xticks(layers)
        ax.set_xlabel("layer whose dims are zeroed")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: teacher check", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
