"""The Hugging Face model inside the wrappers training puts around it."""

from __future__ import annotations

import sys

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` / PEFT wrappers.

    Hooks installed on the inner model's modules fire when the wrapper runs, and a PEFT model's
    injected layers (LoRA's ``lora_A``/``lora_B``) stay in place inside the blocks, so taps see the
    adapted hidden states.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif is_peft_model(model):
            model = model.get_base_model()
        elif _is_peft_tuner(model):  # LoraModel & co., the PeftModel's base_model
            model = model.model
        else:
            return model


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (a model can only be one once peft is imported, so
    this never imports it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _is_peft_tuner(model: nn.Module) -> bool:
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is not None and isinstance(model, tuners.BaseTuner)
