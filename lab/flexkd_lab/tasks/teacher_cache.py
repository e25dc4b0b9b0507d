"""Train a task's teacher once and cache it on disk, keyed by everything it depends on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from flexkd._io import apply_umask

from .training import FitConfig, fit

CACHE_FORMAT = 2  # 2: trained by the library loop (flexkd.training.finetune)
REPORT_FILE = "flexkd_teacher.json"


def default_cache_dir() -> str:
    """``$FLEXKD_CACHE/teachers``, or ``~/.cache/flexkd/teachers``."""
    root = os.environ.get("FLEXKD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "flexkd"
    )
    return os.path.join(root, "teachers")


@dataclass
class CachedTeacher:
    model: torch.nn.Module  # in eval mode
    path: str  # the cache entry (``save_pretrained`` folder plus flexkd_teacher.json)
    report: dict  # fit settings, training stats, validation metrics, identity
    reused: bool  # True when loaded from the cache, False when trained by this call


def teacher_key(task, fit_config: FitConfig, seed: int) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "identity": task.identity(),
        "fit": fit_config.to_dict(),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _load(task, path: str, device) -> CachedTeacher:
    with open(os.path.join(path, REPORT_FILE), encoding="utf-8") as f:
        report = json.load(f)
    model = task.load_teacher(path).to(device).eval()
    return CachedTeacher(model, path, report, reused=True)


def get_teacher(
    task,
    cache_dir: str | os.PathLike | None = None,
    *,
    fit_config: FitConfig | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    eval_limit: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> CachedTeacher:
    """The task's trained teacher: loaded from ``cache_dir`` when an entry with the same key
    exists (data files, task config, base weights, fit settings, seed), else trained on
    the train split, evaluated on ``eval_limit`` validation rows, and saved atomically
    (written to a temporary folder, then renamed into place).

    ``task`` is a task name or a task object from ``flexkd_lab.tasks.get_task``."""
    from . import get_task

    task = get_task(task) if isinstance(task, str) else task
    fit_config = fit_config or task.teacher_fit
    if not isinstance(fit_config, FitConfig):
        raise TypeError(f"fit_config: expected a FitConfig, got {type(fit_config).__name__}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cache_dir = os.fspath(cache_dir or default_cache_dir())
    key = teacher_key(task, fit_config, seed)
    path = os.path.join(cache_dir, f"{task.name}-{key[:16]}")
    if not force and os.path.isfile(os.path.join(path, REPORT_FILE)):
        return _load(task, path, device)

    model = task.build_teacher(seed=seed).to(device)
    stats = fit(model, task, fit_config, desc=f"teacher {task.name}", progress=progress)
    limit = task.teacher_eval_limit if eval_limit is None else eval_limit
    metrics = task.evaluate(model, "validation", limit=limit, progress=progress)
    extra = {}
    if limit is None and hasattr(task, "teacher_baseline"):  # a full evaluation: the bar it must clear
        extra["test"] = task.evaluate(model, "test", progress=progress)
        extra["baseline"] = task.teacher_baseline()
    report = {
        "key": key,
        "task": task.name,
        "seed": seed,
        "fit": fit_config.to_dict(),
        "train": stats,
        "validation": metrics,
        "identity": task.identity(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        **extra,
    }
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{task.name}-")
    try:
        model.save_pretrained(tmp)
        task.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        apply_umask(tmp)  # mkdtemp and safetensors made it 0700/0600
        if force and os.path.isdir(path):
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, REPORT_FILE)):
                raise
            # Another process finished the same teacher first: keep its entry.
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CachedTeacher(model.eval(), path, report, reused=False)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
