"""The YAML run configuration, validated up front with pydantic.

One file drives ``flexkd score``, ``flexkd distill`` and ``flexkd eval``::

    model:
      teacher: path/to/teacher            # an HF path or id, a config dict, or "task:NAME"
      student: {config: {model_type: bert, hidden_size: 96, num_hidden_layers: 2, ...}}
    data: {task: sequence, train: data/train.jsonl, validation: data/val.jsonl}
    selection: {layers: [-1]}             # k defaults to the student's hidden size
    distill: {feature: flex, weights: {task: 1.0, logit: 0.5, feature: 1.0}}
    train: {output_dir: runs/flex, lr: 5.0e-4, batch_size: 16, max_steps: 500, checkpoint_every: 100}

Relative paths (data files, ``output_dir``, ``selection.path``, local model folders) are
resolved against the YAML file's folder. Every error names the offending field
(``ConfigError: train.lr: Input should be greater than 0``). ``overrides`` such as
``["train.max_steps=10"]`` patch the YAML before validation (the CLI's ``--set``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from flexkd._io import one_line, read_text
from flexkd.errors import ConfigError

TaskName = Literal["causal_lm", "sequence", "seq2seq", "token"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSection(_Section):
    """Train the student as a PEFT LoRA adapter (``pip install flexkd[peft]``): its own weights stay
    frozen and only the adapter learns; the run saves the adapter (``save_merged``: also the merged
    model, under ``student/merged``)."""

    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="module names (or dotted suffixes) to adapt; default: PEFT's for the model type",
    )
    save_merged: bool = False


class ModelFromConfig(_Section):
    """A randomly initialised model built with ``from_config`` (seeded by ``train.seed``)."""

    config: dict[str, Any]
    lora: LoraSection | None = None
    adapter: str | None = Field(
        None,
        description="teacher only: a PEFT adapter folder loaded on top of it (pip install flexkd[peft])",
    )

    @field_validator("config")
    @classmethod
    def _has_model_type(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("model_type"), str):
            raise ValueError("needs a 'model_type' entry (e.g. gpt2, llama, bert, bart)")
        return value


class ModelFromPretrained(_Section):
    """An HF path or id, written as a mapping so that it can carry a ``lora`` section or an ``adapter``."""

    pretrained: str
    lora: LoraSection | None = None
    adapter: str | None = Field(
        None,
        description="teacher only: a PEFT adapter folder loaded on top of it (pip install flexkd[peft])",
    )


def _model_spec_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "ModelFromPretrained" if "pretrained" in value else "ModelFromConfig"
    return type(value).__name__ if isinstance(value, BaseModel) else "str"


# tagged, so that an error inside one form is reported for that form only
ModelSpec = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[ModelFromConfig, Tag("ModelFromConfig")]
    | Annotated[ModelFromPretrained, Tag("ModelFromPretrained")],
    Discriminator(_model_spec_kind),
]


class ModelSection(_Section):
    teacher: ModelSpec
    student: ModelSpec
    tokenizer: str | None = Field(
        None, description="tokenizer path; default: the teacher's when it is a path"
    )
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="cast the (frozen) teacher, e.g. bfloat16 to halve its memory; default: as built",
    )

    @field_validator("teacher", "student")
    @classmethod
    def _non_empty(cls, value: ModelSpec) -> ModelSpec:
        name = value.pretrained if isinstance(value, ModelFromPretrained) else value
        if isinstance(name, str) and not name.strip():
            raise ValueError(
                "must be an HF path or id, a {config: {...}} or {pretrained: ...} mapping, or 'task:NAME'"
            )
        return value

    @field_validator("teacher")
    @classmethod
    def _teacher_has_no_lora(cls, value: ModelSpec) -> ModelSpec:
        if getattr(value, "lora", None) is not None:
            raise ValueError(
                "lora: only the student is trained, so only model.student takes a lora section "
                "(a trained PEFT adapter is loaded on the teacher with model.teacher.adapter: PATH)"
            )
        return value

    @field_validator("student")
    @classmethod
    def _student_has_no_adapter(cls, value: ModelSpec) -> ModelSpec:
        if getattr(value, "adapter", None) is not None:
            raise ValueError(
                "adapter: only model.teacher loads a PEFT adapter; a LoRA student is trained from "
                "model.student.lora"
            )
        return value

    @property
    def student_lora(self) -> LoraSection | None:
        return getattr(self.student, "lora", None)

    @property
    def teacher_adapter(self) -> str | None:
        return getattr(self.teacher, "adapter", None)


class DataSection(_Section):
    task: TaskName
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    factory: str | None = Field(
        None, description="'task:NAME' or 'module:function' returning the splits"
    )
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    target_field: str = "target"
    max_length: PositiveInt = 128
    target_max_length: PositiveInt = 64
    group_by_length: bool = Field(
        False,
        description="batch rows of similar length (sorted within groups of 16 steps' rows), so less "
        "compute goes to padding; the order stays a function of train.seed and the epoch",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.train is None) == (self.factory is None):
            raise ValueError("give exactly one of 'train' (a data file or folder) and 'factory'")
        return self


class SelectionSection(_Section):
    path: str | None = Field(None, description="default: <train.output_dir>/selection.safetensors")
    layers: list[int] | None = Field(
        None, description="default: the teacher layers of distill.layer_pairs"
    )
    k: PositiveInt | None = Field(None, description="default: the student's hidden size")
    stat: Literal["grad_x_act", "grad", "grad_sq"] = "grad_x_act"
    which: Literal["top", "bottom", "random"] = "top"
    order: Literal["index", "score"] = "index"
    split: Literal["train", "validation", "test"] = "train"
    batch_size: PositiveInt = 8
    max_rows: PositiveInt | None = Field(
        None, description="rows to score in all (the same rows for any world size); default: all"
    )
    max_batches: PositiveInt | None = Field(
        None, description="deprecated: read as max_rows = max_batches * batch_size"
    )

    @model_validator(mode="after")
    def _one_budget(self) -> SelectionSection:
        if self.max_batches is not None:
            if self.max_rows is not None:
                raise ValueError("give max_rows only (max_batches is deprecated)")
            warnings.warn(
                f"selection.max_batches is deprecated (it counted batches per process); read as "
                f"max_rows = max_batches * batch_size = {self.row_budget}; set selection.max_rows",
                FutureWarning,
                stacklevel=2,
            )
        return self

    @property
    def row_budget(self) -> int | None:
        """The rows to score over all processes (None: all)."""
        if self.max_batches is not None:
            return self.max_batches * self.batch_size
        return self.max_rows


class LossWeights(_Section):
    task: NonNegativeFloat = 1.0
    logit: NonNegativeFloat = 0.0
    feature: NonNegativeFloat = 1.0


class DistillSection(_Section):
    feature: Literal["flex", "projector", "cka", "none"] = "flex"
    feature_loss: Literal["mse", "corr", "cka"] = "mse"  # cka: feature="flex" only
    layer_pairs: Literal["last"] | list[tuple[int, int]] = "last"
    weights: LossWeights = LossWeights()
    logit_kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: PositiveFloat = 1.0
    beta: float = Field(0.5, gt=0.0, lt=1.0)
    projector_direction: Literal["student_to_teacher", "teacher_to_student"] = "student_to_teacher"
    side: Literal["encoder", "decoder"] | None = None
    logit_kd_backend: Literal["auto", "fused", "materialised"] = "auto"
    # A folder of the teacher's outputs on data.train (flexkd.teacher_outputs), written on first use; the
    # teacher then never runs during training.
    teacher_outputs: str | None = None
    # Keep the teacher's K largest logits per position in that store instead of the whole vocabulary;
    # logit KD then reads the top-K renormalised at the temperature (flexkd.teacher_outputs).
    teacher_topk: PositiveInt | None = None

    @model_validator(mode="after")
    def _cka_loss_needs_flex(self) -> DistillSection:
        if self.feature_loss == "cka" and self.feature == "projector":
            raise ValueError(
                "feature_loss: 'cka' applies to feature 'flex' (CKA on the selected dims); train a "
                "projector with 'mse' or 'corr'"
            )
        return self

    @model_validator(mode="after")
    def _topk_needs_a_store(self) -> DistillSection:
        if self.teacher_topk is not None and self.teacher_outputs is None:
            raise ValueError(
                "teacher_topk: top-K teacher logits are a stored-outputs format; set "
                "distill.teacher_outputs too"
            )
        if self.teacher_topk is not None and self.logit_kind == "reverse_kl":
            raise ValueError(
                "teacher_topk: reverse_kl is infinite against a top-K teacher (no mass off its K "
                "indices); use logit_kind forward_kl or jsd, or dense teacher outputs"
            )
        return self

    @field_validator("layer_pairs")
    @classmethod
    def _non_empty_pairs(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError(
                "must be 'last' or a non-empty list of [student_layer, teacher_layer] pairs"
            )
        return value


class TrainSection(_Section):
    output_dir: str
    lr: PositiveFloat = 5e-4
    weight_decay: NonNegativeFloat = 0.0
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    max_steps: PositiveInt | None = None
    epochs: PositiveFloat | None = None
    warmup_steps: NonNegativeInt = 0
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: PositiveFloat | None = 1.0
    seed: int = 0
    checkpoint_every: PositiveInt | None = None
    keep_checkpoints: PositiveInt = 2
    resume: bool = True
    log_every: PositiveInt = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    progress: bool = True

    @model_validator(mode="after")
    def _one_length(self) -> TrainSection:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'max_steps' and 'epochs'")
        return self


class EvalSection(_Section):
    split: Literal["train", "validation", "test"] = "validation"
    batch_size: PositiveInt = 16
    models: list[Literal["student", "teacher"]] = Field(
        default_factory=lambda: ["student"], min_length=1
    )
    student_path: str | None = Field(None, description="default: <train.output_dir>/student")
    output: str | None = Field(None, description="default: <train.output_dir>/eval.json")


class FSDPSection(_Section):
    """``torch.distributed.fsdp.fully_shard`` per transformer block and the model (several processes)."""

    teacher: bool = Field(False, description="shard the frozen teacher over the processes")
    student: bool = Field(False, description="shard the student (and its optimizer state)")
    reshard_after_forward: bool = Field(
        True, description="free gathered parameters after each block's forward (less memory)"
    )
    replicas: int = Field(
        1,
        ge=1,
        description="HSDP: shard within groups of world_size / replicas processes and replicate across "
        "the groups (e.g. one group per node); 1 shards over all processes",
    )


class DistributedSection(_Section):
    fsdp: FSDPSection = FSDPSection()


class Config(_Section):
    model: ModelSection
    data: DataSection
    selection: SelectionSection = SelectionSection()
    distill: DistillSection = DistillSection()
    train: TrainSection
    eval: EvalSection = EvalSection()
    distributed: DistributedSection = DistributedSection()
    base_dir: str = Field(
        ".", description="folder relative paths are resolved against (set by load_config)"
    )

    def path(self, value: str | os.PathLike) -> Path:
        """``value`` resolved against ``base_dir`` (absolute paths unchanged)."""
        return (Path(self.base_dir) / Path(value)).resolve()

    @property
    def output_dir(self) -> Path:
        return self.path(self.train.output_dir)

    @property
    def selection_path(self) -> Path:
        return (
            self.path(self.selection.path)
            if self.selection.path
            else self.output_dir / "selection.safetensors"
        )

    @property
    def student_path(self) -> Path:
        return (
            self.path(self.eval.student_path)
            if self.eval.student_path
            else self.output_dir / "student"
        )

    @property
    def eval_output(self) -> Path:
        return self.path(self.eval.output) if self.eval.output else self.output_dir / "eval.json"

    def resolved(self) -> dict[str, Any]:
        """Every field as plain JSON data, with each path resolved as the run uses it (a model or
        tokenizer name that is a local path becomes that path), so two configs that run the same thing
        from different folders compare equal."""
        data = self.model_dump(mode="json", exclude={"base_dir"})
        for field in ("teacher", "student", "tokenizer"):
            spec = data["model"][field]
            if isinstance(spec, str) and not spec.startswith("task:") and self.path(spec).exists():
                data["model"][field] = str(self.path(spec))
            elif isinstance(spec, dict) and spec.get("pretrained") and self.path(spec["pretrained"]).exists():
                spec["pretrained"] = str(self.path(spec["pretrained"]))
        if self.model.teacher_adapter is not None:
            data["model"]["teacher"]["adapter"] = str(self.path(self.model.teacher_adapter))
        for split in ("train", "validation", "test"):
            if data["data"][split] is not None:
                data["data"][split] = str(self.path(data["data"][split]))
        data["selection"]["path"] = str(self.selection_path)
        if self.distill.teacher_outputs is not None:
            data["distill"]["teacher_outputs"] = str(self.path(self.distill.teacher_outputs))
        data["train"]["output_dir"] = str(self.output_dir)
        data["eval"]["student_path"] = str(self.student_path)
        data["eval"]["output"] = str(self.eval_output)
        return data


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "tuple"})


def _field_name(loc: tuple) -> str:
    """Dotted field path of a pydantic error location, without union-member tags."""
    parts = []
    for part in loc:
        text = str(part)
        is_tag = isinstance(part, str) and (
            not text.isidentifier() or text[0].isupper() or text in _TYPE_TAGS
        )
        if not is_tag:
            parts.append(text)
    return ".".join(parts) or "<top level>"


def _format_error(error: ValidationError, source: str) -> str:
    messages: dict[str, list[str]] = {}
    for item in error.errors():
        field = _field_name(item["loc"])
        if item["type"] == "extra_forbidden":
            text = "unknown field"
        elif item["type"] == "missing":
            text = "field required"
        else:
            text = f"{item['msg']} (got {item['input']!r})"
        messages.setdefault(field, []).append(text)
    lines = [f"{field}: " + "; or ".join(dict.fromkeys(texts)) for field, texts in messages.items()]
    return f"{source}: invalid configuration\n  " + "\n  ".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Patch ``raw`` with ``"dotted.key=value"`` items; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected 'section.field=value'")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text)
        rival = _EXCLUSIVE_FIELDS.get(key.strip())
        if rival is not None and node[parts[-1]] is not None:
            node.pop(rival, None)  # --set train.max_steps=N replaces the file's epochs (and back)
    return raw


# pairs of fields of which a config gives one: overriding one drops the other
_EXCLUSIVE_FIELDS = {"train.max_steps": "epochs", "train.epochs": "max_steps"}


def _looks_local(spec: str) -> bool:
    """A model name that can only be a folder (an HF id is ``name`` or ``owner/name``)."""
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or "\\" in spec


def _check_models(config: Config, source: str) -> None:
    """What pydantic cannot see: local model folders exist and ``{config: ...}`` models build."""
    for role in ("teacher", "student", "tokenizer"):
        spec = getattr(config.model, role)
        if isinstance(spec, str) and not spec.startswith("task:") and _looks_local(spec):
            if not config.path(Path(spec).expanduser()).exists():
                raise ConfigError(
                    f"{source}: model.{role}: no such folder {config.path(Path(spec).expanduser())}; "
                    "make it first (flexkd-lab's `flexkd teacher TASK --out PATH` fine-tunes a teacher) "
                    f"or point model.{role} at another folder or an HF model id"
                )
        if isinstance(spec, ModelFromConfig):
            _check_model_config(spec.config, f"model.{role}.config", source)
    adapter = config.model.teacher_adapter
    if adapter is not None and not (config.path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(
            f"{source}: model.teacher.adapter: {config.path(adapter)} is not a PEFT adapter folder "
            "(no adapter_config.json; PeftModel.save_pretrained writes one)"
        )


def _check_model_config(options: dict[str, Any], field: str, source: str) -> None:
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = options["model_type"]
    if model_type not in CONFIG_MAPPING_NAMES:
        closest = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(closest)}" if closest else ""
        raise ConfigError(
            f"{source}: {field}.model_type: unknown model type {model_type!r} "
            f"(transformers knows {len(CONFIG_MAPPING_NAMES)}){hint}"
        )
    rest = {k: v for k, v in options.items() if k != "model_type"}
    aliases = {}
    try:
        built = AutoConfig.for_model(model_type, **rest)
        aliases = {real: alias for alias, real in built.attribute_map.items() if alias in rest}
        type(built)(**built.to_dict())  # validates the fields an alias (hidden_size -> n_embd) set
    except (StrictDataclassFieldValidationError, TypeError, ValueError) as error:
        text = one_line(error)
        named = re.search(r"field '(\w+)'", text)
        name = aliases.get(named.group(1), named.group(1)) if named else None
        where = f"{field}.{name}" if name in rest else field
        detail = text.split("TypeError: ", 1)[-1] if named else text
        raise ConfigError(f"{source}: {where}: {detail}") from None


def parse_config(
    raw: Any, *, base_dir: str | os.PathLike = ".", source: str = "<config>"
) -> Config:
    """Validate a mapping (as read from YAML) into a :class:`Config`."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the configuration must be a mapping of sections, got {type(raw).__name__}"
        )
    if "base_dir" in raw:
        raise ConfigError(f"{source}: base_dir: unknown field (it is set from the file's location)")
    try:
        return Config.model_validate({**raw, "base_dir": str(base_dir)})
    except ValidationError as error:
        raise ConfigError(_format_error(error, source)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read, patch and validate a YAML config; relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no file at {path}")
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({one_line(error)})") from None
    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):
        return parse_config(raw, source=str(path))
    raw = apply_overrides(raw, list(overrides or []))
    config = parse_config(raw, base_dir=path.parent.resolve(), source=str(path))
    _check_models(config, str(path))
    return config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every config-driven command takes: the YAML path and ``--set`` overrides."""
    parser.add_argument("config", help="YAML run configuration")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable), e.g. --set train.max_steps=10",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
