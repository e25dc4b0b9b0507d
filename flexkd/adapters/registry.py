"""Adapters by model family (``config.model_type``), and a generic fallback for the rest."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flexkd.adapters.base import ModelAdapter
from flexkd.adapters.masks import detect_task
from flexkd.adapters.wrappers import unwrap_model
from flexkd.errors import UnsupportedModelError

SIDES = ("encoder", "decoder")


@dataclass(frozen=True)
class StackSpec:
    """Where one stack lives, as dotted attribute paths.

    ``root`` is relative to ``model.base_model`` (``""``: the base model itself); ``layers`` (the
    ``nn.ModuleList`` of blocks) and ``final`` are relative to ``root``. ``final`` lists the modules that
    run after the last block, in order; the last one the model actually has gives ``hidden_states[-1]``
    (a missing attribute or one set to ``None`` is skipped).
    """

    root: str
    layers: str
    final: tuple[str, ...] = ()


@dataclass(frozen=True)
class FamilySpec:
    """The stacks of one model family; the first one is the default side."""

    name: str
    stacks: dict[str, StackSpec]


_REGISTRY: dict[str, FamilySpec] = {}


def register_family(model_types: tuple[str, ...] | str, family: FamilySpec) -> None:
    """Make ``get_adapter`` use ``family`` for models whose ``config.model_type`` is in ``model_types``."""
    if isinstance(model_types, str):
        model_types = (model_types,)
    for side in family.stacks:
        if side not in SIDES:
            raise ValueError(f"family.stacks keys must be in {SIDES}, got {side!r}")
    for model_type in model_types:
        _REGISTRY[model_type] = family


def registered_model_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


register_family("gpt2", FamilySpec("gpt2", {"decoder": StackSpec("", "h", ("ln_f",))}))
register_family(
    ("llama", "qwen2", "mistral"),
    FamilySpec("llama", {"decoder": StackSpec("", "layers", ("norm",))}),
)
# OPT: the final norm exists only with do_layer_norm_before; OPT-350m instead projects the last hidden
# state down to word_embed_proj_dim with project_out, which HF's hidden_states[-1] includes.
register_family(
    "opt",
    FamilySpec(
        "opt", {"decoder": StackSpec("decoder", "layers", ("final_layer_norm", "project_out"))}
    ),
)
register_family(
    ("bert", "roberta"), FamilySpec("bert", {"encoder": StackSpec("", "encoder.layer")})
)
# BART has no norm after either stack; mBART has layer_norm after both.
register_family(
    ("bart", "mbart"),
    FamilySpec(
        "bart",
        {
            "encoder": StackSpec("encoder", "layers", ("layer_norm",)),
            "decoder": StackSpec("decoder", "layers", ("layer_norm",)),
        },
    ),
)


def get_adapter(model: nn.Module, side: str | None = None) -> ModelAdapter:
    """The adapter for ``model``'s ``side`` stack (default: the encoder of a seq2seq model, else the only one).

    Registered families are looked up by ``config.model_type``; other models go through a generic fallback
    that finds the blocks from ``_can_record_outputs`` or a ``ModuleList`` of ``num_hidden_layers`` blocks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not model_type:
        raise UnsupportedModelError(
            f"model: {type(model).__name__} has no config.model_type; flexkd adapters need a Hugging Face "
            f"PreTrainedModel (looked for model.config.model_type)"
        )
    if side is not None and side not in SIDES:
        raise ValueError(f"side must be None or one of {SIDES}, got {side!r}")
    base = getattr(model, "base_model", model)
    family = _REGISTRY.get(model_type)
    if family is not None:
        roots = {name: _get_path(base, spec.root) for name, spec in family.stacks.items()}
    else:
        roots = _generic_roots(model, base)
    side = _choose_side(side, tuple(roots), model_type)
    root = roots[side]
    if family is not None:
        spec = family.stacks[side]
        blocks = list(_get_path(root, spec.layers))
        final = _last_present(root, spec.final)
        family_name = family.name
    else:
        blocks = _generic_blocks(root, config, side, model_type)
        final = root  # HF ties hidden_states[-1] to the stack's last_hidden_state
        family_name = "generic"
    hidden_size = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if hidden_size is None:
        raise UnsupportedModelError(
            f"model: config of {model_type!r} has no hidden_size (looked for hidden_size, d_model)"
        )
    final_width = getattr(final, "out_features", None) if isinstance(final, nn.Linear) else None
    return ModelAdapter(
        model=model,
        model_type=model_type,
        side=side,
        sides=tuple(roots),
        blocks=blocks,
        final=final,
        hidden_size=hidden_size,
        final_width=final_width,
        task=detect_task(model),
        family=family_name,
    )


def _choose_side(side: str | None, sides: tuple[str, ...], model_type: str) -> str:
    if side is None:
        return sides[0]
    if side not in sides:
        raise UnsupportedModelError(f"side {side!r} does not exist in this {model_type} model; it has {sides}")
    return side


def _get_path(module: nn.Module, path: str) -> nn.Module:
    for name in filter(None, path.split(".")):
        module = getattr(module, name)
    return module


def _last_present(root: nn.Module, paths: tuple[str, ...]) -> nn.Module | None:
    present = None
    for path in paths:
        try:
            module = _get_path(root, path)
        except AttributeError:
            continue
        if module is not None:
            present = module
    return present


def _generic_roots(model: nn.Module, base: nn.Module) -> dict[str, nn.Module]:
    if getattr(model.config, "is_encoder_decoder", False):
        get_encoder = getattr(base, "get_encoder", None) or getattr(model, "get_encoder", None)
        get_decoder = getattr(base, "get_decoder", None) or getattr(model, "get_decoder", None)
        if get_encoder is None or get_decoder is None:
            raise UnsupportedModelError(
                f"model: no adapter for model_type {model.config.model_type!r} and the generic fallback "
                f"found no get_encoder()/get_decoder() on this encoder-decoder model"
            )
        return {"encoder": get_encoder(), "decoder": get_decoder()}
    causal = detect_task(model) == "causal_lm" or getattr(model.config, "is_decoder", False)
    return {"decoder" if causal else "encoder": base}


def _generic_blocks(root: nn.Module, config, side: str, model_type: str) -> list[nn.Module]:
    expected = _expected_layers(config, side)
    block_class = _recorded_block_class(root)
    if block_class is not None:
        blocks = [m for m in root.modules() if isinstance(m, block_class)]
        if blocks and (expected is None or len(blocks) == expected):
            return blocks
    candidates = [
        m
        for m in root.modules()
        if isinstance(m, nn.ModuleList) and expected is not None and len(m) == expected
    ]
    if len(candidates) == 1:
        return list(candidates[0])
    raise UnsupportedModelError(
        f"model: no adapter for model_type {model_type!r}. Registered families: {registered_model_types()}. "
        f"The generic fallback looked for the block class in _can_record_outputs['hidden_states'] and for "
        f"exactly one nn.ModuleList of {expected} blocks (config num_hidden_layers) in the {side}, and found "
        f"{len(candidates)} such lists; register one with flexkd.adapters.register_family"
    )


def _expected_layers(config, side: str) -> int | None:
    # T5 names its decoder depth num_decoder_layers (num_layers is the encoder's)
    keys = (f"{side}_layers", f"num_{side}_layers", "num_hidden_layers", "n_layer", "num_layers")
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _recorded_block_class(root: nn.Module) -> type | None:
    spec = (getattr(type(root), "_can_record_outputs", None) or {}).get("hidden_states")
    if isinstance(spec, list):
        spec = spec[0] if len(spec) == 1 else None
    if isinstance(spec, type):
        return spec
    target = getattr(spec, "target_class", None)
    return target if isinstance(target, type) else None
