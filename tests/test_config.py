"""YAML configs: validated up front, every error names its field; overrides; relative paths."""

import copy
from pathlib import Path

import pytest
import yaml

from flexkd.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
VALID = {
    "model": {
        "teacher": "teachers/minilm",
        "student": {"config": {"model_type": "bert", "hidden_size": 16}},
    },
    "data": {"task": "sequence", "train": "data/train.jsonl"},
    "train": {"output_dir": "runs/a", "max_steps": 10},
}


def _write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _patched(path_value_pairs):
    data = copy.deepcopy(VALID)
    for dotted, value in path_value_pairs:
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(leaf)
        else:
            node[leaf] = value
    return data


_DELETE = object()


def test_valid_config_defaults_and_paths_relative_to_the_file(tmp_path):
    cfg = load_config(_write(tmp_path, VALID))
    assert cfg.distill.feature == "flex" and cfg.distill.layer_pairs == "last"
    assert cfg.distill.weights.task == 1.0 and cfg.distill.weights.logit == 0.0
    assert cfg.output_dir == (tmp_path / "runs/a").resolve()
    assert cfg.selection_path == (tmp_path / "runs/a/selection.safetensors").resolve()
    assert cfg.student_path == (tmp_path / "runs/a/student").resolve()
    assert cfg.path("data/train.jsonl") == (tmp_path / "data/train.jsonl").resolve()


@pytest.mark.parametrize(
    ("patch", "field", "message"),
    [
        ([("train.lr", -1)], "train.lr", "greater than 0"),
        ([("train.batch_size", 0)], "train.batch_size", "greater than 0"),
        ([("train.output_dir", _DELETE)], "train.output_dir", "field required"),
        ([("train.epochs", 2)], "train", "exactly one of 'max_steps' and 'epochs'"),
        ([("distill.fature", "flex")], "distill.fature", "unknown field"),
        ([("distill.feature", "pca")], "distill.feature", "'flex', 'projector', 'cka' or 'none'"),
        ([("distill.layer_pairs", [[1, 2, 3]])], "distill.layer_pairs.0", "at most 2 items"),
        ([("distill.layer_pairs", [])], "distill.layer_pairs", "non-empty"),
        ([("distill.beta", 1.5)], "distill.beta", "less than 1"),
        (
            [("distill.feature", "projector"), ("distill.feature_loss", "cka")],
            "distill",
            "'cka' applies to feature 'flex'",
        ),
        (
            [("distill.weights", {"logit": -0.5})],
            "distill.weights.logit",
            "greater than or equal to 0",
        ),
        ([("distill.weights", {"kd": 1})], "distill.weights.kd", "unknown field"),
        (
            [("model.student", {"config": {"hidden_size": 16}})],
            "model.student.config",
            "model_type",
        ),
        ([("model.teacher", "")], "model.teacher", "HF path"),
        ([("data.train", _DELETE)], "data", "exactly one of 'train'"),
        ([("data.task", "regression")], "data.task", "causal_lm"),
        ([("selection.stat", "act")], "selection.stat", "grad_x_act"),
        ([("eval.models", [])], "eval.models", "at least 1"),
        ([("training", {})], "training", "unknown field"),
    ],
)
def test_bad_config_error_names_the_field(tmp_path, patch, field, message):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, _patched(patch)))
    text = str(caught.value)
    assert str(tmp_path / "cfg.yaml") in text
    line = next(
        (line.strip() for line in text.splitlines() if line.strip().startswith(f"{field}:")), None
    )
    assert line is not None, text
    assert message in line, text


def test_yaml_syntax_error_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="no file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="base_dir"):
        parse_config({**VALID, "base_dir": "/"})


def test_overrides_patch_before_validation(tmp_path):
    path = _write(tmp_path, VALID)
    cfg = load_config(
        path, ["train.max_steps=3", "distill.layer_pairs=[[1, 2]]", "distill.weights.logit=0.5"]
    )
    assert (
        cfg.train.max_steps == 3
        and cfg.distill.layer_pairs == [(1, 2)]
        and cfg.distill.weights.logit == 0.5
    )
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(path, ["train.lr=-3"])
    with pytest.raises(ConfigError, match="expected 'section.field=value'"):
        load_config(path, ["train.lr"])


@pytest.mark.parametrize("command", ["score", "distill", "eval"])
def test_cli_reports_the_bad_field_and_exits_2(tmp_path, capsys, command):
    from flexkd.cli import main

    path = _write(tmp_path, _patched([("train.lr", 0)]))
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"flexkd {command}: error" in err and "train.lr: Input should be greater than 0" in err


@pytest.mark.parametrize(
    "example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_examples_are_valid_configs(example):
    source = example.read_text()
    cfg = parse_config(yaml.safe_load(source), base_dir=example.parent, source=str(example))
    teacher = cfg.model.teacher
    if isinstance(teacher, str) and not cfg.path(teacher).exists():
        # the example names the step that makes its teacher, and load_config says so up front
        assert f"flexkd teacher debian-sections --out runs/teachers/{Path(teacher).name}" in source
        with pytest.raises(ConfigError, match=r"model\.teacher: no such folder .*flexkd teacher"):
            load_config(example)
    for split in ("train", "validation", "test"):
        value = getattr(cfg.data, split)
        if value is not None:
            assert cfg.path(value).is_file(), f"{example.name}: data.{split} {value} does not exist"


def test_missing_local_model_folder_is_named_up_front(tmp_path):
    path = _write(tmp_path, _patched([("model.teacher", "./teachers/minilm")]))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "model.teacher: no such folder" in message and str(tmp_path / "teachers" / "minilm") in message
    assert "\n" not in message
    (tmp_path / "teachers" / "minilm").mkdir(parents=True)
    assert load_config(path).model.teacher == "./teachers/minilm"


def test_an_hf_id_is_not_taken_for_a_folder(tmp_path):
    assert load_config(_write(tmp_path, VALID)).model.teacher == "teachers/minilm"


def test_unknown_model_type_names_the_field_and_the_closest_names(tmp_path):
    path = _write(tmp_path, _patched([("model.student.config.model_type", "bret")]))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "model.student.config.model_type: unknown model type 'bret'" in message
    assert "closest: bert" in message and len(message) < 400


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.student.config.hidden_size=abc", "model.student.config.hidden_size"),
        ("model.student.config.num_hidden_layers=two", "model.student.config.num_hidden_layers"),
    ],
)
def test_a_bad_model_config_value_is_one_line_naming_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, VALID), [override])
    message = str(caught.value)
    assert f"{field}: " in message and "expected int" in message and "\n" not in message


def test_an_alias_field_is_named_as_written(tmp_path):
    data = _patched([("model.student", {"config": {"model_type": "gpt2", "hidden_size": "abc"}})])
    with pytest.raises(ConfigError, match=r"model\.student\.config\.hidden_size: .*'n_embd' expected int"):
        load_config(_write(tmp_path, data))


def test_set_max_steps_replaces_epochs_and_back(tmp_path):
    data = _patched([("train.max_steps", _DELETE), ("train.epochs", 3)])
    path = _write(tmp_path, data)
    cfg = load_config(path, ["train.max_steps=200"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (200, None)
    cfg = load_config(path, ["train.max_steps=200", "train.epochs=1"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (None, 1.0)
    with pytest.raises(ConfigError, match="exactly one of 'max_steps' and 'epochs'"):
        parse_config({**data, "train": {**data["train"], "max_steps": 5}}, base_dir=tmp_path)


@pytest.mark.parametrize("command", ["score", "distill", "eval"])
def test_cli_reports_a_missing_teacher_in_one_line_up_front(tmp_path, capsys, command):
    from flexkd.cli import main

    path = _write(tmp_path, _patched([("model.teacher", "../runs/teachers/minilm-sections")]))
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flexkd {command}: error: ") and "\n" not in err
    assert "model.teacher: no such folder" in err and "flexkd teacher" in err
