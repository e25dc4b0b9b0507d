"""The quality study behind ``flexkd study``: for each teacher -> student pair on debian-sections, every
feature method tuned on one validation grid (feature weight x layer pairing, >= 2 seeds per point), then
every method at its chosen knobs over all the seeds, reported on the test split with per-example statistics.

Each finished (pair, method, knobs, seed) run is its own JSON file under ``<out>/study-runs/<group>``,
written atomically, where ``<group>`` is the pair and a fingerprint of the run budget: a changed budget gets
a new group (never mixed with the old one), more seeds or methods just add runs, and a rerun skips every
finished run, so the study can be killed at any point and restarted. Runs are seeded and single-threaded
per worker, so a resumed study stores exactly what an uninterrupted one would. Tables (``study.md``,
``study.json``) and plots are rewritten after every run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from flexkd._io import sha256_file, write_json
from flexkd.errors import ConfigError, ResumeMismatchError, UnreadableFileError
from flexkd_lab.experiments.budget import RunBudget, TuningGrid, knobs_tag, pair_budget, study_grid
from flexkd_lab.experiments.kits import build_kit, quiet_transformers
from flexkd_lab.experiments.methods import STUDY_METHODS, get_method
from flexkd_lab.experiments.pipeline import Experiment, remove_teacher_outputs
from flexkd_lab.experiments.store import ResultStore
from flexkd_lab.experiments.teacher_check import run_teacher_check

TASK = "debian-sections"
SPLITS = (
    "validation",
    "test",
)  # every run is evaluated on both: the grid chooses on one, reports the other
TEACHER_CHECK = "teacher-check"
RESULTS_FOLDER = (
    "study-runs"  # not "runs": that name is git-ignored, and these results are committed
)
REFERENCES = "references.json"
TEACHER_RECORD = "teacher.json"  # the teacher every run of a group was distilled from
CURVE_POINTS = 100  # a stored learning curve is averaged into at most this many windows
# per-run fields that measure the machine, not the run: left out when resumed and fresh results are compared
TIMING_FIELDS = ("train_seconds", "eval_seconds", "job_seconds", "thread_seconds", "elapsed_s")


class Run(NamedTuple):
    """One job of the study; ``knobs`` is ``None`` for a method without a feature term and the teacher check."""

    pair: str
    method: str
    knobs: dict[str, Any] | None
    seed: int

    @property
    def folder(self) -> str:
        """The run's folder name in the store: the method, and the grid point it ran at."""
        return self.method if self.knobs is None else f"{self.method}.{knobs_tag(self.knobs)}"


@dataclass(frozen=True)
class StudyPlan:
    """What the study runs: ``pairs`` x ``methods`` x ``seeds`` on debian-sections, after the grid."""

    pairs: tuple[str, ...] = ("minilm-tiny",)
    methods: tuple[str, ...] = STUDY_METHODS
    seeds: tuple[int, ...] = tuple(range(5))
    teacher_check: bool = True
    quick: bool = False
    budgets: dict[str, RunBudget] = field(default_factory=dict)  # per pair, replacing pair_budget's
    grids: dict[str, TuningGrid] = field(default_factory=dict)  # per pair, replacing study_grid's

    def __post_init__(self) -> None:
        from flexkd_lab.tasks.pairs import get_pair

        for name in self.methods:
            get_method(name)
        if not self.methods:
            raise ConfigError("methods: need at least one")
        for pair in self.pairs:
            get_pair(pair)
        if not self.pairs:
            raise ConfigError("pairs: need at least one")
        if len(self.seeds) < 2 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds
        ):
            raise ConfigError(
                f"seeds: expected >= 2 distinct ints >= 0 (a confidence interval needs two), got {self.seeds!r}"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected distinct seeds, got {self.seeds!r}")

    def budget(self, pair: str) -> RunBudget:
        return self.budgets.get(pair) or pair_budget(pair, quick=self.quick)

    def grid(self, pair: str) -> TuningGrid:
        return self.grids.get(pair) or study_grid(pair, quick=self.quick)

    def group(self, pair: str) -> str:
        """The store folder of ``pair``'s runs: the pair and a fingerprint of everything a run depends on
        besides its method, knobs and seed."""
        from dataclasses import asdict

        from flexkd_lab.tasks.pairs import get_pair

        recipe = {
            "pair": pair,
            "pair_recipe": asdict(get_pair(pair)),  # teacher fit, student shape and dropout
            "task": TASK,
            "quick": self.quick,
            "budget": self.budget(pair).to_dict(),
        }
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
        return f"{pair}-{digest}"

    def tuned_methods(self) -> list[str]:
        """The methods tuned on the grid: every feature method's ``tuned_as`` (random-k and bottom-k run at
        the knobs their top-k method chose)."""
        return list(
            dict.fromkeys(
                get_method(m).tuned_as for m in self.methods if get_method(m).feature != "none"
            )
        )

    def grid_runs(self, pair: str) -> list[Run]:
        grid = self.grid(pair)
        return [
            Run(pair, method, knobs, seed)
            for seed in grid.seeds
            for knobs in grid.points()
            for method in self.tuned_methods()
        ]

    def final_runs(self, pair: str, choice: dict[str, dict[str, Any]]) -> list[Run]:
        """Every method x seed at its chosen knobs, seed-major so that a partial study covers each method
        evenly (``choice`` must hold every tuned method's knobs)."""
        runs = []
        for seed in self.seeds:
            for name in self.methods:
                method = get_method(name)
                knobs = None if method.feature == "none" else choice[method.tuned_as]
                runs.append(Run(pair, name, knobs, seed))
        return runs


def store_has(store: ResultStore, plan: StudyPlan, run: Run) -> bool:
    return store.has(plan.group(run.pair), run.folder, run.seed)


def read_run(store: ResultStore, plan: StudyPlan, run: Run) -> dict[str, Any]:
    return store.read(plan.group(run.pair), run.folder, run.seed)


def grid_scores(
    plan: StudyPlan, store: ResultStore, pair: str
) -> dict[str, list[tuple[dict[str, Any], float | None]]]:
    """For each tuned method, each grid point with its mean validation headline metric over the grid seeds
    (``None`` until every grid seed of that point finished)."""
    grid, headline = plan.grid(pair), "accuracy"
    scores: dict[str, list[tuple[dict[str, Any], float | None]]] = {}
    for method in plan.tuned_methods():
        for knobs in grid.points():
            runs = [Run(pair, method, knobs, seed) for seed in grid.seeds]
            values = None
            if all(store_has(store, plan, r) for r in runs):
                values = statistics.fmean(
                    read_run(store, plan, r)["splits"]["validation"]["metrics"][headline]
                    for r in runs
                )
            scores.setdefault(method, []).append((knobs, values))
    return scores


def grid_choice(plan: StudyPlan, store: ResultStore, pair: str) -> dict[str, dict[str, Any]] | None:
    """Each tuned method's best grid point on validation (ties: the first in grid order); ``None`` while
    any grid run is missing."""
    choice = {}
    for method, points in grid_scores(plan, store, pair).items():
        if any(value is None for _, value in points):
            return None
        choice[method] = max(points, key=lambda point: point[1])[0]  # max keeps the first of equals
    return choice


# ---------------------------------------------------------------------------------------------- running
class _Experiments:
    """One :class:`Experiment` per pair, built (teacher fine-tune or cache) only when first needed."""

    def __init__(self, plan: StudyPlan, work_dir: Path, cache_dir: Path, progress: bool) -> None:
        self.plan, self.work_dir, self.cache_dir, self.progress = (
            plan,
            work_dir,
            cache_dir,
            progress,
        )
        self._built: dict[str, Experiment] = {}

    def __getitem__(self, pair: str) -> Experiment:
        if pair not in self._built:
            budget = self.plan.budget(pair)
            kit = build_kit(
                TASK,
                budget,
                cache_dir=self.cache_dir,
                pair=pair,
                quick=self.plan.quick,
                progress=self.progress,
            )
            # one scratch folder per teacher and budget: a selection belongs to the teacher it was scored on
            work = self.work_dir / self.plan.group(pair) / Path(kit.teacher_dir).name
            grid_pairs = self.plan.grid(pair).layer_pairs
            self._built[pair] = Experiment(
                kit, budget, work, progress=self.progress, layer_pairs=grid_pairs
            )
        return self._built[pair]


def run_study(
    out_dir: str | Path,
    plan: StudyPlan,
    *,
    cache_dir: str | Path,
    work_dir: str | Path,
    command: str,
    progress: bool = True,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every pending part of ``plan``; results under ``out_dir/study-runs``, tables and plots in ``out_dir``.

    Pair by pair: its teacher (trained or loaded here, first), the teacher check, the grid, then every
    method x seed at the chosen knobs. With ``workers > 1`` the runs go to that many processes, each with an
    equal share of the CPU threads (one each on two cores); this process first writes the data, teacher
    outputs and selection files every run reads, so the workers only read them. A run's numbers depend on
    the threads it ran with: resume with the same ``--workers`` (and ``OMP_NUM_THREADS``).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers: expected an int >= 1, got {workers!r}")
    quiet_transformers()
    out_dir = Path(out_dir)
    store = ResultStore(out_dir / RESULTS_FOLDER)
    settings = (plan, Path(work_dir), Path(cache_dir))
    # this process keeps its threads (it trains the teachers and writes their outputs while no run is going)
    _init_worker(*settings, progress=progress)
    experiments = _worker_experiments
    threads = max(1, torch.get_num_threads() // workers)
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(*settings, False, threads)
        )
    try:
        for pair in plan.pairs:
            experiment = experiments[pair]
            _check_teacher(store, plan, pair, experiment.kit.teacher_dir)
            jobs = [Run(pair, TEACHER_CHECK, None, 0)] if plan.teacher_check else []
            jobs += plan.grid_runs(pair)
            _run_jobs(jobs, experiment, store, plan, pool, out_dir, command, log)
            choice = grid_choice(plan, store, pair)
            if choice is None:
                raise RuntimeError(f"{pair}: the grid has missing runs after running it")
            _run_jobs(
                plan.final_runs(pair, choice), experiment, store, plan, pool, out_dir, command, log
            )
    finally:
        if pool is not None:
            pool.terminate()
    freed = remove_teacher_outputs(
        work_dir
    )  # a finished study no longer needs them; a resume rewrites them
    if freed:
        log(f"removed the stored teacher outputs under {work_dir} ({freed / 2**30:.1f} GiB)")
    return write_report(out_dir, plan, store, command)


def teacher_weights_sha256(teacher_dir: str | Path) -> str:
    """One sha256 over the teacher folder's ``*.safetensors`` files (name and bytes, in name order): two
    teachers trained from one recipe on different CPUs or thread counts differ here, not in their key."""
    files = sorted(Path(teacher_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{teacher_dir}: the cached teacher has no *.safetensors weights")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def teacher_record(teacher_dir: str | Path) -> dict[str, Any]:
    """What identifies the teacher a group's runs were distilled from, and the machine it was trained on."""
    return {
        "teacher_key": Path(teacher_dir).name,
        "weights_sha256": teacher_weights_sha256(teacher_dir),
        "machine": {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            **{name: os.environ.get(name) for name in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")},
        },
    }


def _check_teacher(store: ResultStore, plan: StudyPlan, pair: str, teacher_dir: str | Path) -> None:
    """Record the group's teacher in ``teacher.json`` on its first run; on a resume, refuse a teacher with
    another recipe key or other weights. The teacher cache does not outlive the machine, and a retrain on
    another CPU (or with other threads) gives other bytes: runs of two teachers are never mixed."""
    group = store.root / plan.group(pair)
    current = teacher_record(teacher_dir)
    record_path = group / TEACHER_RECORD
    if record_path.is_file():
        try:
            stored = json.loads(record_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UnreadableFileError(record_path, f"not valid JSON ({err})") from None
        for field_name in ("teacher_key", "weights_sha256"):
            if stored.get(field_name) != current[field_name]:
                raise ResumeMismatchError(
                    f"{group} holds runs distilled from teacher {stored.get('teacher_key')} "
                    f"(weights sha256 {str(stored.get('weights_sha256'))[:16]}..., trained with "
                    f"{stored.get('machine')}), but the cache now gives {current['teacher_key']} "
                    f"(sha256 {current['weights_sha256'][:16]}..., {current['machine']}): its {field_name} "
                    "differs. Resume where that teacher is cached, or move the folder away / use another --out; "
                    "results of two teachers are never mixed"
                )
        return
    for path in sorted(group.glob("*/seed-*.json"))[:1]:  # a group from before teacher.json existed
        stored_key = json.loads(path.read_text(encoding="utf-8")).get("teacher_key")
        if stored_key is not None and stored_key != current["teacher_key"]:
            raise ResumeMismatchError(
                f"{group} holds runs distilled from teacher {stored_key}, but the cache now gives "
                f"{current['teacher_key']} (its recipe changed): move that folder away or use another --out; "
                "results of two teachers are never mixed"
            )
    write_json(record_path, current)


def _run_jobs(
    planned: Sequence[Run],
    experiment: Experiment,
    store: ResultStore,
    plan: StudyPlan,
    pool,
    out_dir: Path,
    command: str,
    log: Callable[[str], None],
) -> None:
    jobs = [run for run in planned if not store_has(store, plan, run)]
    log(
        f"flexkd study: {len(planned) - len(jobs)} of {len(planned)} runs of this phase done, {len(jobs)} to go"
    )
    if not jobs:
        return
    if pool is not None:
        experiment.prepare(
            [(get_method(r.method), r.seed) for r in jobs if r.method != TEACHER_CHECK]
        )
    finished: Iterable = (
        pool.imap_unordered(_run_job, jobs) if pool is not None else map(_run_job, jobs)
    )
    for i, (run, result) in enumerate(finished, start=1):
        _store_result(store, plan, run, result)
        if run.method == TEACHER_CHECK:
            log(f"[{i}/{len(jobs)}] {run.pair} teacher check done in {result['job_seconds']:.0f} s")
        else:
            headline = ", ".join(
                f"{split} {m['metrics']['accuracy']:.3f}" for split, m in result["splits"].items()
            )
            log(
                f"[{i}/{len(jobs)}] {run.pair} {run.folder} seed {run.seed}: accuracy {headline} "
                f"({result['thread_seconds']:.0f} s CPU)"
            )
        write_report(out_dir, plan, store, command)


def _store_result(store: ResultStore, plan: StudyPlan, run: Run, result: dict[str, Any]) -> None:
    """Write the run's record; its reference labels go once to the group's ``references.json`` (a run whose
    labels differ from the stored ones is refused: the data changed under the study)."""
    references = result.pop("references", None)
    group = plan.group(run.pair)
    if references is not None:
        path = store.root / group / REFERENCES
        encoded = {split: encode_labels(labels) for split, labels in references.items()}
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored != encoded:
                raise ResumeMismatchError(
                    f"{path}: the reference labels differ from this run's; the data changed"
                )
        else:
            write_json(path, encoded)
    store.write(group, run.folder, run.seed, {**result, "pair": run.pair, "knobs": run.knobs})


def encode_labels(labels: Sequence[int]) -> str:
    """Per-row labels as one compact string: ``"3,0,17"``."""
    return ",".join(str(int(label)) for label in labels)


def decode_labels(text: str) -> list[int]:
    return [int(label) for label in text.split(",")] if text else []


def compact_curve(
    curve: Sequence[dict[str, Any]], points: int = CURVE_POINTS
) -> list[dict[str, Any]]:
    """The per-step loss records averaged over consecutive windows, at most ``points`` of them; each window
    is stamped with its last step."""
    if not curve:
        return []
    window = -(-len(curve) // points)
    out = []
    for start in range(0, len(curve), window):
        chunk = curve[start : start + window]
        entry: dict[str, Any] = {"step": chunk[-1]["step"]}
        for term in ("task", "logit", "feature", "total"):
            values = [float(r[term]) for r in chunk if term in r]
            if values:
                entry[term] = statistics.fmean(values)
        out.append(entry)
    return out


_worker_experiments: _Experiments | None = None


def _init_worker(
    plan: StudyPlan, work_dir: Path, cache_dir: Path, progress: bool = False, threads: int = 0
) -> None:
    global _worker_experiments
    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()
    _worker_experiments = _Experiments(plan, work_dir, cache_dir, progress)


def _run_job(run: Run) -> tuple[Run, dict[str, Any]]:
    """One study job in this process, with its wall and CPU (this thread's) seconds."""
    experiment = _worker_experiments[run.pair]
    started, cpu = time.perf_counter(), time.thread_time()
    if run.method == TEACHER_CHECK:
        result = teacher_check(experiment)
    else:
        # its own scratch folder: two grid points of one method and seed may run at once
        result = experiment.run(
            get_method(run.method), run.seed, knobs=run.knobs, splits=SPLITS, run_name=run.folder
        )
        for split in result["splits"].values():
            split["predictions"] = encode_labels(split["predictions"])
        result["curve"] = compact_curve(result["curve"])
        result.pop("budget", None)  # the group's fingerprint names it; study.json holds it once
    result["teacher_key"] = Path(experiment.kit.teacher_dir).name
    result["job_seconds"] = round(time.perf_counter() - started, 2)
    result["thread_seconds"] = round(time.thread_time() - cpu, 2)
    return run, result


def teacher_check(experiment: Experiment) -> dict[str, Any]:
    """Score every layer of the teacher (one pass), then re-evaluate it with, at each layer in turn, its
    top-k dims zeroed, k random dims zeroed, and its lowest-scored half zeroed."""
    import flexkd
    from flexkd.adapters import get_adapter

    teacher = experiment.kit.load_teacher()
    adapter = get_adapter(teacher)
    layers = list(range(1, adapter.num_layers + 1))
    k = experiment.kit.student_hidden_size
    selection = flexkd.score(
        teacher, experiment.score_batches(), layers=layers, k=k, progress=experiment.progress
    )
    scores = {layer: selection.scores(layer) for layer in layers}
    started = time.perf_counter()
    rows = run_teacher_check(
        teacher, scores, k, experiment.kit.evaluate_teacher or experiment.kit.evaluate
    )
    return {
        "profile": experiment.selection_profile(teacher),
        "method_label": "teacher check",
        "layers": layers,
        "distilled_layers": [adapter.resolve_layer(layer) for layer in experiment.teacher_layers],
        "k": k,
        "hidden_size": selection.hidden_size,
        "stat": selection.stat,
        "mass_in_top_k": {
            str(layer): float(s.topk(k).values.sum() / s.sum()) for layer, s in scores.items()
        },
        "rows": rows,
        "metrics": {},
        "eval_seconds": round(time.perf_counter() - started, 2),
    }


def teacher_check_table(check: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """One row per layer: ``metric`` of the teacher under each zeroing, and the top-k share of the scores."""
    by_layer: dict[int, dict[str, Any]] = {}
    for row in check["rows"]:
        if row["layer"] is None:
            continue
        kind = row["condition"].split()[1].split("-")[0]  # "top" / "random" / "lowest"
        by_layer.setdefault(row["layer"], {"layer": row["layer"]})[kind] = row[metric]
    for layer, entry in by_layer.items():
        entry["mass"] = check["mass_in_top_k"][str(layer)]
        if layer in check.get("distilled_layers", ()):
            entry["layer"] = f"{layer} (distilled)"
    return list(by_layer.values())


def write_report(
    out_dir: Path, plan: StudyPlan, store: ResultStore, command: str
) -> dict[str, Any]:
    """Rewrite the tables and plots from the finished results (:mod:`flexkd_lab.experiments.study_report`)."""
    from flexkd_lab.experiments.study_report import write_report as write

    return write(Path(out_dir), plan, store, command)
