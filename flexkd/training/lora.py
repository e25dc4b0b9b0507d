"""PEFT models from a config: a LoRA student (``model.student.lora``), an adapter loaded on the teacher
(``model.teacher.adapter``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from flexkd.config import LoraSection
from flexkd.errors import ConfigError

FIELD = "model.student.lora"


def _import_peft(field: str, what: str):
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{field}: {what} needs PEFT; pip install 'flexkd[peft]'") from None
    return peft


def load_adapter(model: nn.Module, folder: Path, field: str) -> nn.Module:
    """``model`` with the PEFT adapter saved in ``folder`` loaded on top of it (frozen)."""
    peft = _import_peft(field, "a PEFT adapter")
    try:
        return peft.PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ConfigError(
            f"{field}: cannot load the adapter {folder} on this {type(model).__name__} ({error})"
        ) from None


def add_lora(model: nn.Module, lora: LoraSection) -> nn.Module:
    """``model`` wrapped as a ``peft.PeftModel`` whose only trainable parameters are the adapter's.

    Every entry of ``target_modules`` must name a module of ``model`` (its last name, or a dotted
    suffix of its full name), so a typo fails here, before the first step, rather than adapting less.
    """
    peft = _import_peft(FIELD, "a LoRA student")
    if lora.target_modules is not None:
        check_target_modules(model, lora.target_modules)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # PEFT knows no default target modules for this model type
        raise ConfigError(f"{FIELD}.target_modules: {error}") from None


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        layers = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if name
                and not any(module.children())
                and getattr(module, "weight", None) is not None
            }
        )
        raise ConfigError(
            f"{FIELD}.target_modules: {missing} match no module of this {type(model).__name__}; "
            f"its layers with weights are named {layers}"
        )
