"""The shared run-one-method pipeline of ``flexkd demo`` and ``flexkd study``.

A :class:`TaskKit` bundles what a task provides (tokenizer, fine-tuned teacher, student config, tokenized
rows, an evaluation function). :class:`Experiment` scores the teacher once, writes the selections every
method needs, and runs each method through the library's own training loop (:func:`flexkd.train`,
driven by a validated :class:`flexkd.config.Config`), so every method gets the same data order, steps,
loss weights and learning rate; only the feature term differs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexkd_lab.experiments.budget import RunBudget
from flexkd_lab.experiments.methods import Method


@dataclass
class TaskKit:
    """Everything about one task that the pipeline needs.

    ``hf_task`` is the config's ``data.task`` (``"sequence"`` or ``"causal_lm"``); ``student_factory`` the
    ``"task:NAME"`` model factory that builds the (seeded) student inside the training loop; ``train_rows`` and
    ``score_rows`` are tokenized rows (``input_ids``, ``attention_mask``, ``labels``...) as a
    ``datasets.Dataset``; ``evaluate(model)`` returns the task's metrics on the evaluation rows, headline
    metric first in ``metrics``. ``predict(model, split)`` (classification) returns ``(predicted labels,
    reference labels)`` of the same rows of ``split``, for the study's per-example statistics.
    """

    name: str
    hf_task: str
    tokenizer_dir: str
    teacher_dir: str
    student_factory: str
    student_hidden_size: int
    train_rows: Any
    score_rows: Any
    evaluate: Callable[[nn.Module], dict[str, float]]
    metrics: tuple[str, ...]
    pad_token_id: int = 0
    teacher_description: str = ""
    teacher_metrics: dict[str, Any] = field(default_factory=dict)
    student_description: str = ""
    input_description: str = ""
    # the pair's teacher fed its own ids (pairs whose tokenizers differ); None: ``evaluate`` serves both
    evaluate_teacher: Callable[[nn.Module], dict[str, float]] | None = None
    teacher_baseline: dict[str, Any] = field(
        default_factory=dict
    )  # the unigram-LR bar (tasks.baselines)
    pair: str = "minilm-tiny"
    teacher_pad_token_id: int | None = None  # set when the rows carry teacher_input_ids
    predict: Callable[[nn.Module, str], tuple[list[int], list[int]]] | None = None

    def collator(self):
        """The library's collator for these rows (the teacher's ids padded with the teacher's pad)."""
        from flexkd.training import Collator

        return Collator(
            self.hf_task, self.pad_token_id, teacher_pad_token_id=self.teacher_pad_token_id
        )

    def load_teacher(self) -> nn.Module:
        from flexkd.training import auto_class

        return auto_class(self.hf_task).from_pretrained(self.teacher_dir).eval()

    def load_student(self, path: str | Path) -> nn.Module:
        from flexkd.training import auto_class

        return auto_class(self.hf_task).from_pretrained(str(path)).eval()


def remove_teacher_outputs(folder: str | Path) -> int:
    """Delete every stored-teacher-outputs folder under ``folder`` (scratch that only runs read: about 1 GB
    for the classification task, 3 GB for the summarisation study); returns the bytes freed."""
    freed = 0
    for path in Path(folder).rglob("teacher-outputs-*"):
        if path.is_dir():
            freed += sum(f.stat().st_size for f in path.iterdir())
            shutil.rmtree(path, ignore_errors=True)
    return freed


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The per-step records of a ``metrics.jsonl`` written by :func:`flexkd.train`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Experiment:
    """One task, one budget, one work folder: score once, then run any (method, seed).

    ``layer_pairs``: more layer pairings runs may ask for (:meth:`run`'s ``knobs``) besides the budget's, so
    the stored teacher outputs and the selections cover them.
    """

    def __init__(
        self,
        kit: TaskKit,
        budget: RunBudget,
        work_dir: str | Path,
        *,
        progress: bool = True,
        layer_pairs: Sequence[Any] = (),
    ) -> None:
        self.kit, self.budget, self.progress = kit, budget, progress
        self.layer_pairs = tuple(layer_pairs)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # named by the row count, so a budget with more rows never reads a stale folder
        self._train_data_dir = self.work_dir / "data" / f"train-n{budget.train_examples}"
        self._selections: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ data and selection
    def _train_data(self) -> Path:
        if not self._train_data_dir.exists():
            tmp = self._train_data_dir.with_name(f".{self._train_data_dir.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.kit.train_rows.save_to_disk(str(tmp))
            tmp.replace(self._train_data_dir)
        return self._train_data_dir

    def _teacher_outputs(self) -> Path:
        """The teacher's outputs on the training rows at every layer some method distills, stored once for
        every (method, seed) run (``flexkd.teacher_outputs``)."""
        from flexkd.teacher_outputs import write_teacher_outputs

        path = self.work_dir / f"teacher-outputs-{self._layers_tag}-n{self.budget.train_examples}"
        if not (path / "meta.json").is_file():
            write_teacher_outputs(
                self.kit.load_teacher(),
                self.kit.train_rows,
                path,
                layers=self.teacher_layers,
                collate=self.kit.collator(),
                batch_size=self.budget.batch_size,
                progress=self.progress,
            )
        return path

    def remove_teacher_outputs(self) -> int:
        """:func:`remove_teacher_outputs` of this experiment's folder."""
        return remove_teacher_outputs(self.work_dir)

    @property
    def selection_path(self) -> Path:
        return self._selection_path("top")

    def _selection_path(self, which: str, stat: str = "grad_x_act") -> Path:
        """Named by what the selection depends on besides the teacher (the folder's), so a budget that scores
        other layers or rows never reads a stale file."""
        scores = "" if stat == "grad_x_act" else f"-{stat}"
        return (
            self.work_dir
            / f"selection-{which}{scores}-{self._layers_tag}-n{self.budget.score_examples}.safetensors"
        )

    @property
    def _layers_tag(self) -> str:
        """``teacher_layers`` in file names: ``last-3``."""
        return "-".join("last" if layer == -1 else str(layer) for layer in self.teacher_layers)

    def selection(self, teacher: nn.Module | None = None, stat: str = "grad_x_act"):
        """The top-k selection (k = the student's hidden size) by ``stat`` of every teacher layer a method
        distills, scored once."""
        import flexkd
        from flexkd.selection import DimensionSelection

        if stat in self._selections:
            return self._selections[stat]
        path = self._selection_path("top", stat)
        if path.exists():
            self._selections[stat] = DimensionSelection.load(path, teacher)
            return self._selections[stat]
        teacher = teacher if teacher is not None else self.kit.load_teacher()
        selection = flexkd.score(
            teacher,
            self.score_batches(),
            layers=self.teacher_layers,
            k=self.kit.student_hidden_size,
            stat=stat,
            progress=self.progress,
        )
        selection.save(path)
        self._selections[stat] = selection
        return selection

    def score_batches(self) -> list[dict[str, torch.Tensor]]:
        """The scoring rows as model-ready batches of ``budget.batch_size``."""

        collate = self.kit.collator()
        rows, size = self.kit.score_rows, self.budget.batch_size
        return [
            collate([rows[j] for j in range(i, min(i + size, len(rows)))])
            for i in range(0, len(rows), size)
        ]

    def selection_profile(
        self, teacher: nn.Module | None = None, layer: int | None = None
    ) -> dict[str, float]:
        """:func:`flexkd_lab.experiments.profile.selection_profile` of the top-k selection at ``layer`` (default:
        the deepest scored) on the scoring rows."""
        from flexkd_lab.experiments.profile import selection_profile

        teacher = teacher if teacher is not None else self.kit.load_teacher()
        selection = self.selection(teacher)
        return selection_profile(teacher, selection, self.score_batches(), layer=layer)

    @property
    def teacher_layers(self) -> list[int]:
        """Every teacher layer some method of this experiment distills (one selection file covers them)."""
        pairings = [self.budget.layer_pairs, *self.layer_pairs]
        pairings += [self.budget.layer_pairs_for(m) for m in self.budget.tuned]
        return sorted({layer for pairs in pairings for layer in _teacher_layers(pairs)})

    def teacher_layers_of(self, method: str | None) -> list[int]:
        pairs = self.budget.layer_pairs if method is None else self.budget.layer_pairs_for(method)
        return _teacher_layers(pairs)

    def _selection_file(self, method: Method, seed: int) -> Path:
        """The selection file ``method`` distills (top-k is shared; random-k is drawn per seed)."""
        from flexkd.selection import DimensionSelection

        top = self.selection(stat=method.stat)
        if method.which == "top":
            return self._selection_path("top", method.stat)
        path = self._selection_path(f"{method.which}-seed{seed}", method.stat)
        if not path.exists():
            DimensionSelection.from_scores(
                {layer: top.scores(layer) for layer in top.layers},
                top.k,
                which=method.which,
                seed=seed,
                stat=top.stat,
                tokens_seen=top.tokens_seen,
                teacher=top.teacher,
                data_fingerprint=top.data_fingerprint,
            ).save(path)
        return path

    def prepare(self, runs: Sequence[tuple[Method, int]]) -> None:
        """Write the training data and every selection file ``runs`` read, so that runs in other processes
        only read them."""
        self._train_data()
        self._teacher_outputs()
        for method, seed in runs:
            if method.uses_selection:
                self._selection_file(method, seed)

    # ------------------------------------------------------------------------------ runs
    def config(
        self, method: Method, seed: int, output_dir: Path, knobs: dict[str, Any] | None = None
    ):
        """The validated :class:`flexkd.config.Config` of one run; ``knobs`` (``layer_pairs``,
        ``feature_weight``) replace the budget's tuned ones of ``method``."""
        from flexkd.config import parse_config

        b = self.budget
        if knobs is not None:
            b = b.with_(tuned={**b.tuned, method.tuned_as: dict(knobs)})
        raw: dict[str, Any] = {
            "model": {
                "teacher": self.kit.teacher_dir,
                "student": self.kit.student_factory,
                "tokenizer": self.kit.tokenizer_dir,
            },
            "data": {
                "task": self.kit.hf_task,
                "train": str(self._train_data()),
                "group_by_length": b.group_by_length,
            },
            "distill": {
                "feature": method.feature,
                "feature_loss": method.feature_loss,
                "layer_pairs": b.layer_pairs_for(method.tuned_as),
                "weights": b.weights_for(method.tuned_as),
                "temperature": b.temperature,
                "teacher_outputs": str(self._teacher_outputs()),
            },
            "train": {
                "output_dir": str(output_dir),
                "lr": b.lr,
                "batch_size": b.batch_size,
                "max_steps": b.steps,
                "warmup_steps": b.warmup_steps,
                "seed": seed,
                "resume": False,
                "log_every": 1,
                "progress": self.progress,
            },
        }
        if method.uses_selection:
            raw["selection"] = {
                "path": str(self._selection_file(method, seed)),
                "layers": _teacher_layers(b.layer_pairs_for(method.tuned_as)),
            }
        return parse_config(raw, source=f"{self.kit.name}/{method.name}/seed-{seed}")

    def run(
        self,
        method: Method,
        seed: int,
        *,
        keep_student: bool = False,
        run_name: str | None = None,
        knobs: dict[str, Any] | None = None,
        splits: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Distill one student with ``method`` and evaluate it; returns metrics, timings and the learning curve.

        The run's scratch folder is ``runs/<run_name or method name>/seed-<seed>``: give runs of one method
        that may overlap in time (other budgets, other processes) their own ``run_name``. ``knobs``: see
        :meth:`config`. With ``splits`` the student is evaluated by ``kit.predict`` on each of them instead:
        ``result["splits"][split]`` holds its metrics and per-row predicted labels, ``result["references"]``
        the labels, and ``result["metrics"]`` are those of ``budget.eval_split``.
        """
        from flexkd.training import train

        output_dir = self.work_dir / "runs" / (run_name or method.name) / f"seed-{seed}"
        cfg = self.config(method, seed, output_dir, knobs)
        torch.manual_seed(seed)
        started = time.perf_counter()
        result = train(cfg)
        train_seconds = time.perf_counter() - started
        student = self.kit.load_student(result.student_dir)
        started = time.perf_counter()
        evaluated: dict[str, Any] = {}
        if splits:
            evaluated = self.predict(student, splits)
            metrics = evaluated["splits"][self.budget.eval_split]["metrics"]
        else:
            metrics = self.kit.evaluate(student)
        eval_seconds = time.perf_counter() - started
        curve = read_metrics(result.metrics_path)
        if not keep_student:
            shutil.rmtree(output_dir, ignore_errors=True)
        return {
            **evaluated,
            "method_label": method.label,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "steps": result.steps,
            "budget": self.budget.to_dict(),
            "inputs": self.kit.input_description,
            "teacher": self.kit.teacher_description,
            "student": self.kit.student_description,
            "curve": [
                {
                    k: r[k]
                    for k in ("step", "task", "logit", "feature", "total", "elapsed_s")
                    if k in r
                }
                for r in curve
            ],
        }

    def predict(self, model: nn.Module, splits: Sequence[str]) -> dict[str, Any]:
        """``{"splits": {split: {"metrics", "predictions"}}, "references": {split: labels}}`` of ``model``."""
        from flexkd_lab.tasks import metrics as task_metrics

        if self.kit.predict is None:
            raise ValueError(
                f"{self.kit.name}: the kit has no predict(); per-example results need one"
            )
        out: dict[str, Any] = {"splits": {}, "references": {}}
        for split in splits:
            predicted, references = self.kit.predict(model, split)
            out["splits"][split] = {
                "metrics": {
                    name: float(getattr(task_metrics, name)(predicted, references))
                    for name in self.kit.metrics
                },
                "predictions": [int(p) for p in predicted],
            }
            out["references"][split] = [int(r) for r in references]
        return out


def _teacher_layers(pairs: Any) -> list[int]:
    """The teacher layers a ``layer_pairs`` value distills: ``"last"`` is ``[-1]``."""
    return [-1] if pairs == "last" else sorted({t for _, t in pairs})
