"""Loading the committed Debian snapshot (no network)."""

from __future__ import annotations

import functools
import gzip
import json
import os
from dataclasses import dataclass

SNAPSHOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "debian")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    file_prefix: str
    kind: str  # "classification" | "summarization"


TASKS: dict[str, TaskSpec] = {
    "debian-sections": TaskSpec("debian-sections", "sections", "classification"),
    "debian-synopsis": TaskSpec("debian-synopsis", "synopsis", "summarization"),
}


def synopsis_tokenizer_file(data_dir: str = SNAPSHOT_DIR) -> str:
    """The committed byte-level BPE ``tokenizer.json`` of ``debian-synopsis``."""
    path = os.path.join(data_dir, "synopsis-tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no synopsis tokenizer at {path}; run `python -m flexkd_lab.data.build_debian`"
        )
    return path


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


@functools.lru_cache(maxsize=4)
def snapshot_meta(data_dir: str = SNAPSHOT_DIR) -> dict:
    """The snapshot's ``meta.json``: release, input hashes, build config, labels, counts."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no snapshot at {data_dir}; run `python -m flexkd_lab.data.build_debian`"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def label_names(task: str, data_dir: str = SNAPSHOT_DIR) -> list[str]:
    """The class names of a classification task, in label-id order."""
    spec = task_spec(task)
    if spec.kind != "classification":
        raise ValueError(f"task: {task!r} is a {spec.kind} task and has no labels")
    return list(snapshot_meta(data_dir)["labels"][task])


def read_rows(
    task: str, split: str, limit: int | None = None, data_dir: str = SNAPSHOT_DIR
) -> list[dict]:
    """The raw rows of one split as dicts (labels still as section names)."""
    spec = task_spec(task)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
        raise TypeError(f"limit: expected an int or None, got {type(limit).__name__}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit: expected >= 0, got {limit}")
    path = os.path.join(data_dir, f"{spec.file_prefix}-{split}.jsonl.gz")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(json.loads(line))
    return rows


def load_task(task: str, split: str, limit: int | None = None, data_dir: str = SNAPSHOT_DIR):
    """One split of a task as a ``datasets.Dataset``; ``limit`` keeps the first rows (the
    files are stored in a hash order, so a prefix is a fair sample).

    ``debian-sections``: columns ``id, package, packages, source, text, label`` with
    ``label`` a ``ClassLabel`` (``ds.features["label"].names`` == ``label_names(task)``).
    ``debian-synopsis``: columns ``id, package, source, text, summary``. ``id`` is the
    ``Description-md5``; ``source`` the source package (what splits are drawn by)."""
    import datasets

    spec = task_spec(task)
    rows = read_rows(task, split, limit, data_dir)
    if spec.kind == "classification":
        names = label_names(task, data_dir)
        index = {n: i for i, n in enumerate(names)}
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "package": datasets.Value("string"),
                "packages": datasets.Sequence(datasets.Value("string")),
                "source": datasets.Value("string"),
                "text": datasets.Value("string"),
                "label": datasets.ClassLabel(names=names),
            }
        )
        for row in rows:
            row["label"] = index[row["label"]]
    else:
        features = datasets.Features(
            {k: datasets.Value("string") for k in ("id", "package", "source", "text", "summary")}
        )
    return datasets.Dataset.from_list(rows, features=features)
