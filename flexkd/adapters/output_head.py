"""A causal LM's output projection, so logit losses can run on its final hidden state without ``[B, T, V]``.

``output_projection(model)`` returns the head module (its input is the final hidden state) and the
affine map ``logits = hidden @ weight.T + bias`` it computes, with what the model does to the logits
after the head folded in where that stays affine (Cohere's ``logit_scale``, Granite's ``logits_scaling``)
and refused where it does not (Gemma's ``final_logit_softcapping``). Tied embeddings need nothing
special: ``weight`` is the embedding matrix itself. A model that does anything else after its head is
caught by :func:`check_projection`, which compares against the model's own logits once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    if type(head) is not nn.Linear:
        raise UnsupportedHead(
            f"{type(model).__name__}'s output projection is a {type(head).__name__}, not a plain nn.Linear"
        )
    return OutputProjection(head, _logit_scale(model))


class _HeadReached(Exception):
    pass


@contextlib.contextmanager
def capture_head_input(projection: OutputProjection, *, stop: bool) -> Iterator[dict]:
    """While active, the head's input lands in ``captured["hidden"]``; with ``stop`` the forward ends
    there (run it through :func:`run_until_head`)."""
    captured: dict = {}

    def pre_hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["input"]
        if stop:
            raise _HeadReached

    handle = projection.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def run_until_head(projection: OutputProjection, call) -> torch.Tensor:
    """The final hidden state ``call()`` feeds the head, without running the head or anything after."""
    with capture_head_input(projection, stop=True) as captured:
        try:
            call()
        except _HeadReached:
            return captured["hidden"]
    raise RuntimeError("the forward pass finished without calling the output projection")


@torch.no_grad()
def check_projection(model: nn.Module, projection: OutputProjection, inputs: dict) -> None:
    """Raise :class:`UnsupportedHead` unless ``model(**inputs).logits`` equals the projection of the
    head's input (to fp32 rounding of the logits' size). The random state is left as it was (dropout
    draws here must not shift a resumed run's)."""
    devices = [projection.weight.device] if projection.weight.device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=devices),
        capture_head_input(projection, stop=False) as captured,
    ):
        logits = model(**inputs).logits
    hidden, weight, bias = projection.affine(captured["hidden"])
    rebuilt = hidden @ weight.T if bias is None else hidden @ weight.T + bias
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
