"""One JSON file per finished (task, method, seed) run, written atomically, so a study can be killed and rerun.

store = ResultStore("benchmarks/results/runs")
if not store.has("debian-sections", "flex-mse", 0):
    store.write("debian-sections", "flex-mse", 0, result)
store.all()          # every finished result, sorted by task, method, seed
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from flexkd._io import write_json
from flexkd.errors import ConfigError, UnreadableFileError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ConfigError(
            f"{what}: expected a name of letters, digits, '_', '.', '-', got {name!r}"
        )
    return name


class ResultStore:
    """Finished run results under ``root/<task>/<method>/seed-<seed>.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, task: str, method: str, seed: int) -> Path:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: expected an int >= 0, got {seed!r}")
        return (
            self.root
            / _check_name(task, "task")
            / _check_name(method, "method")
            / f"seed-{seed}.json"
        )

    def has(self, task: str, method: str, seed: int) -> bool:
        return self.path(task, method, seed).is_file()

    def write(self, task: str, method: str, seed: int, result: dict[str, Any]) -> Path:
        record = {**result, "task": task, "method": method, "seed": seed}
        return write_json(self.path(task, method, seed), record)

    def read(self, task: str, method: str, seed: int) -> dict[str, Any]:
        with open(self.path(task, method, seed), encoding="utf-8") as f:
            return json.load(f)

    def all(self) -> list[dict[str, Any]]:
        """Every stored result (files that do not parse are reported, not skipped silently)."""
        records = []
        for path in sorted(self.root.glob("*/*/seed-*.json")):
            try:
                with open(path, encoding="utf-8") as f:
                    records.append(json.load(f))
            except json.JSONDecodeError as err:
                raise UnreadableFileError(
                    path, f"not valid JSON ({err}); delete it to rerun that run"
                ) from None
        return sorted(records, key=lambda r: (r["task"], r["method"], r["seed"]))
