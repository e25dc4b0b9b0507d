"""Markdown tables of run results: one row per run (the demo), or mean ± std over seeds (the study)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

METRIC_HEADERS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "rouge_l": "ROUGE-L"}


def method_columns(
    metrics: Sequence[str], *, seeds: bool = False, timing: bool = True
) -> list[tuple[str, str]]:
    """The columns of a table with one row per method: its label and knobs, the seeds it ran (the study),
    its metrics and its train time."""
    columns = [("label", "method"), ("knobs", "layers; feature weight")]
    columns += [("seeds", "seeds")] if seeds else []
    columns += [(m, METRIC_HEADERS.get(m, m)) for m in metrics]
    return columns + ([("train_seconds", "train time (s)")] if timing else [])


def format_value(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], digits: int = 3
) -> str:
    """``columns`` is ``[(key, header), ...]``; missing keys print empty."""
    if not columns:
        raise ValueError("columns: need at least one (key, header) pair")
    header = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(format_value(row.get(k), digits) for k, _ in columns) + " |"
        for row in rows
    ]
    return "\n".join([header, rule, *body])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("values: need at least one number")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    *,
    group_by: Sequence[str] = ("task", "method"),
    digits: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per group: ``<metric>_mean``, ``<metric>_std``, ``<metric>`` as "m ± s", and ``seeds``.

    A metric is read from ``record["metrics"]``, else from the record itself (e.g. ``train_seconds``);
    ``digits`` sets the decimals of a metric's "m ± s" text (default 3).
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(record[k] for k in group_by), []).append(record)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(group_by, key, strict=True))
        row["seeds"] = len(members)
        for metric in metrics:
            values = [float(v) for v in (_lookup(m, metric) for m in members) if v is not None]
            if not values:
                continue
            mean, std = mean_std(values)
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
            places = (digits or {}).get(metric, 3)
            row[metric] = f"{mean:.{places}f} ± {std:.{places}f}"
        rows.append(row)
    return rows


def _lookup(record: Mapping[str, Any], name: str) -> Any:
    metrics = record.get("metrics", {})
    return metrics[name] if name in metrics else record.get(name)
