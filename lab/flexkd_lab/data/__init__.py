"""Offline real-text data: a committed snapshot of Debian package descriptions.

``load_task("debian-sections" | "debian-synopsis", split, limit=None)`` returns a
``datasets.Dataset``; ``label_names("debian-sections")`` the class names. Rebuild the
snapshot with ``python -m flexkd_lab.data.build_debian`` (see debian/PROVENANCE.md)."""

from .loaders import (
    SNAPSHOT_DIR,
    SPLITS,
    TASKS,
    label_names,
    load_task,
    read_rows,
    snapshot_meta,
    synopsis_tokenizer_file,
    task_spec,
)

__all__ = [
    "SNAPSHOT_DIR",
    "SPLITS",
    "TASKS",
    "label_names",
    "load_task",
    "read_rows",
    "snapshot_meta",
    "synopsis_tokenizer_file",
    "task_spec",
]
