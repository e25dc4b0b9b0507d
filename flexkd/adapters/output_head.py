"""A causal LM's output projection, so logit losses can run on its final hidden state without ``[B, T, V]``.

``output_projection(model)`` returns the head module (its input is the final hidden state) and the
affine map ``logits = hidden @ weight.T + bias`` it computes, with what the model does to the logits
after the head folded in where that stays affine (Cohere's ``logit_scale``, Granite's ``logits_scaling``)
and refused where it does not (Gemma's ``final_logit_softcapping``). Tied embeddings need nothing
special: ``weight`` is the embedding matrix itself. A model that does anything else after its head is
caught by :func:`check_projection`, which compares against the model's own logits once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedHead(ValueError):
    """The model's logits are not an affine map of its head's input that flexkd can reproduce."""


@dataclass(frozen=True)
class OutputProjection:
    module: nn.Module  # the head: its first positional input is the final hidden state
    logit_scale: float  # logits = logit_scale * head(hidden)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def affine(
        self, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(hidden', weight, bias')`` with ``hidden' @ weight.T + bias'`` equal to the model's logits."""
        bias = self.bias
        if self.logit_scale == 1.0:
            return hidden, self.weight, bias
        return (
            hidden * self.logit_scale,
            self.weight,
            None if bias is None else bias * self.logit_scale,
        )


def _logit_scale(model: nn.Module) -> float:
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise UnsupportedHead(
            f"{type(model).__name__} soft-caps its logits (config.final_logit_softcapping={softcap}): "
            "not an affine map of the final hidden state"
        )
    scale = 1.0
    logit_scale = getattr(model, "logit_scale", None)  # Cohere multiplies the head's output
    if isinstance(logit_scale, int | float) and not isinstance(logit_scale, bool):
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides it
    if isinstance(logits_scaling, int | float) and not isinstance(logits_scaling, bool):
        scale /= float(logits_scaling)
    return scale


def output_projection(model: nn.Module) -> OutputProjection:
    """The output projection of ``model`` (raises :class:`UnsupportedHead` saying why there is none)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise UnsupportedHead(
            f"{type(model).__name__} has no output projection (get_output_embeddings() is None)"
        )
    if _class_before_sharding(head) is not nn.Linear:
        raise UnsupportedHead(
            f"{type(model).__name__}'s output projection is a {type(head).__name__}, not a plain nn.Linear"
        )
    return OutputProjection(head, _logit_scale(model))


def _class_before_sharding(module: nn.Module) -> type:
    """``type(module)``, or the class ``fully_shard`` derived the module's class ``FSDP<class>`` from."""
    cls = type(module)
    if not torch.distributed.is_available():
        return cls
    from torch.distributed.fsdp import FSDPModule

    if issubclass(cls, FSDPModule):
        return next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


def run_in_place_of_head(projection: OutputProjection, head_fn, call):
    """``head_fn(hidden)``, computed inside ``call()`` where the head would turn the final hidden state
    into logits, so the model's ``[B, T, V]`` logits are never made.

    The head's forward itself is replaced, so everything around it runs as usual: in a sharded (FSDP2)
    model, whose head has its full weight only during the head's forward, FSDP's hooks gather the
    weight before ``head_fn`` reads it, reshard it after and reduce-scatter its gradient in backward.
    The head returns an empty ``[..., 0]`` tensor in place of the logits.

    Returns ``(head_fn's result, call()'s result)``. FSDP2 hooks its pre-backward (which gathers
    resharded weights again before their gradients arrive) onto the model's outputs, so a loss built
    from ``head_fn``'s result must keep the model's (empty) logits in its graph, e.g. ``+ logits.sum()``."""
    module = projection.module
    results = []

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["input"]
        results.append(head_fn(hidden))
        return hidden[..., :0].clone()  # not a view: an in-place op on one would drop FSDP's hooks

    module.forward = forward  # an instance attribute: nn.Module.__call__ still runs every hook
    try:
        output = call()
    finally:
        del module.forward
    if len(results) != 1:
        raise RuntimeError(
            f"the forward pass called the output projection {len(results)} times, expected once"
        )
    return results[0], output


@torch.no_grad()
def check_projection(model: nn.Module, projection: OutputProjection, inputs: dict) -> None:
    """Raise :class:`UnsupportedHead` unless ``model(**inputs).logits`` equals the projection of the
    head's input (to fp32 rounding of the logits' size). The random state is left as it was (dropout
    draws here must not shift a resumed run's)."""
    rebuilt = []

    def rebuild(module, args, kwargs):  # in the head's forward: a sharded head's weight is whole here
        hidden, weight, bias = projection.affine(args[0] if args else kwargs["input"])
        rebuilt.append(hidden @ weight.T if bias is None else hidden @ weight.T + bias)

    devices = [projection.weight.device] if projection.weight.device.type == "cuda" else []
    handle = projection.module.register_forward_pre_hook(rebuild, with_kwargs=True)
    try:
        with torch.random.fork_rng(devices=devices):
            logits = model(**inputs).logits
    finally:
        handle.remove()
    (rebuilt,) = rebuilt
    if rebuilt.shape != logits.shape:
        raise UnsupportedHead(
            f"{type(model).__name__}: the output projection gives logits {tuple(rebuilt.shape)}, the "
            f"model returns {tuple(logits.shape)}"
        )
    if not _same_values(
        rebuilt.float(), logits.float(), relative=1e-3 if logits.dtype == torch.float32 else 5e-2
    ):
        raise UnsupportedHead(
            f"{type(model).__name__}'s logits are not hidden @ lm_head.weight.T (+ bias) times the "
            "known logit scale: something the fused path cannot "
            "reproduce runs after the head"
        )


def _same_values(rebuilt: torch.Tensor, logits: torch.Tensor, relative: float) -> bool:
    """Equal to ``relative`` times the logits' size where both are finite, and non-finite (a diverged
    model) at the same places with the same values, which the losses then report."""
    finite = rebuilt.isfinite() & logits.isfinite()
    if not torch.equal(rebuilt.isnan(), logits.isnan()):
        return False
    if not torch.equal(
        rebuilt.masked_fill(finite | rebuilt.isnan(), 0),
        logits.masked_fill(finite | logits.isnan(), 0),
    ):
        return False
    if not finite.any():
        return True
    size = float(logits[finite].abs().max())
    return float((rebuilt - logits)[finite].abs().max()) <= relative * (1.0 + size)
