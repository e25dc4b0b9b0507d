"""The top-level API (lazy, complete dir()), the FlexKDError hierarchy, and how the CLI prints errors."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import write_causal_config

import flexkd
from flexkd import errors
from flexkd.cli import main

PUBLIC = [
    "flex_feature_loss",
    "score",
    "DimensionSelection",
    "Distiller",
    "FlexKDTrainer",
    "train",
    "Config",
]


def test_import_flexkd_loads_neither_torch_nor_transformers():
    code = (
        "import sys, flexkd; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'triton', 'accelerate', 'datasets')); print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _importable_names(directory: Path) -> set[str]:
    return {
        entry.stem
        for entry in directory.iterdir()
        if (entry.is_dir() and (entry / "__init__.py").exists()) or entry.suffix == ".py"
    }


def test_source_tree_shadows_no_installed_module():
    """``python -m ...`` from the repo root puts it first on sys.path, and pytest puts tests/ there: a
    module in either with the name of an installed distribution's module hides it (a top-level
    ``kernels/`` hid Hugging Face's ``kernels``, which transformers imports)."""
    repo = Path(__file__).resolve().parents[1]
    installed = set(importlib.metadata.packages_distributions())
    ours = (_importable_names(repo) | _importable_names(repo / "tests")) - {"flexkd", "conftest"}
    assert not ours & installed, f"modules in the source tree shadow installed ones: {sorted(ours & installed)}"


def test_public_names_resolve_to_their_modules():
    from flexkd.config import Config
    from flexkd.distill import Distiller
    from flexkd.ops import flex_feature_loss
    from flexkd.scoring import score
    from flexkd.selection import DimensionSelection
    from flexkd.trainer import FlexKDTrainer
    from flexkd.training.loop import train

    assert flexkd.flex_feature_loss is flex_feature_loss
    assert flexkd.score is score
    assert flexkd.DimensionSelection is DimensionSelection
    assert flexkd.Distiller is Distiller
    assert flexkd.FlexKDTrainer is FlexKDTrainer and FlexKDTrainer.__module__ == "flexkd.trainer"
    assert flexkd.train is train and callable(flexkd.train)
    assert flexkd.Config is Config
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flexkd.nope  # noqa: B018


def test_dir_and_all_list_the_public_api():
    assert set(PUBLIC) <= set(flexkd.__all__)
    assert dir(flexkd) == sorted(flexkd.__all__)
    for name in flexkd.__all__:
        assert getattr(flexkd, name) is not None, name
    assert "FlexKDError" in dir(flexkd) and "ConfigError" in dir(flexkd)


def test_user_errors_are_flexkd_errors_and_still_value_errors():
    for cls in (
        errors.ConfigError,
        errors.SelectionMismatchError,
        errors.StoreMismatchError,
        errors.UnsupportedModelError,
    ):
        assert issubclass(cls, errors.FlexKDError) and issubclass(cls, ValueError)
    assert issubclass(errors.NonFiniteLossError, FloatingPointError)
    from flexkd.config import ConfigError

    assert ConfigError is errors.ConfigError


def test_cli_prints_a_user_error_in_one_line(tmp_path, capsys):
    path = write_causal_config(tmp_path)
    (tmp_path / "train.jsonl").unlink()
    assert main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("flexkd distill: error: data.train: no file or folder at ")


def test_cli_lets_a_bug_keep_its_traceback(tmp_path, monkeypatch):
    import flexkd.training

    def broken(cfg):
        raise ValueError("an internal bug, not the user's")

    monkeypatch.setattr(flexkd.training, "train", broken)
    with pytest.raises(ValueError, match="internal bug"):
        main(["distill", str(write_causal_config(tmp_path))])


def test_distiller_from_config_maps_the_distill_section(tmp_path):
    from flexkd.config import load_config
    from flexkd.training import build_model

    cfg = load_config(
        write_causal_config(
            tmp_path,
            distill={
                "feature": "projector",
                "feature_loss": "corr",
                "logit_kind": "jsd",
                "temperature": 2.0,
                "beta": 0.3,
                "projector_direction": "teacher_to_student",
                "weights": {"task": 0.5, "logit": 0.25, "feature": 2.0},
            },
        )
    )
    teacher, student = build_model(cfg, "teacher"), build_model(cfg, "student")
    distiller = flexkd.Distiller.from_config(cfg, teacher, student)
    assert distiller.weights == {"task": 0.5, "logit": 0.25, "feature": 2.0}
    assert (distiller.feature, distiller.logit_kind) == ("projector", "jsd")
    assert (distiller.temperature, distiller.beta) == (2.0, 0.3)
    assert distiller.feature_losses[0].direction == "teacher_to_student"
    assert distiller.feature_losses[0].loss == "corr"
    assert distiller.layer_pairs == [(1, 2)]
    with pytest.raises(errors.ConfigError, match="distill: selection: feature='flex' needs"):
        flexkd.Distiller.from_config(cfg.distill.model_copy(update={"feature": "flex"}), teacher, student)


def test_readme_python_api_example_runs():
    import re
    from pathlib import Path

    import torch
    from _train_helpers import STUDENT_HIDDEN, TEACHER_HIDDEN, build, causal_batch, gpt2_config

    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split("## The Python API and the training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    torch.manual_seed(0)
    teacher = build(gpt2_config(TEACHER_HIDDEN, 2), seed=0)
    student = build(gpt2_config(STUDENT_HIDDEN, 1), seed=1)
    batches = [causal_batch() for _ in range(2)]
    before = [p.detach().clone() for p in student.parameters()]
    namespace = dict(torch=torch, teacher=teacher, student=student, scoring_batches=batches, loader=batches)
    exec(compile(code, "README.md", "exec"), namespace)
    assert float(namespace["terms"]["feature"]) > 0 and float(namespace["terms"]["logit"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
