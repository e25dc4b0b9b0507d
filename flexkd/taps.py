"""Forward hooks that capture hidden states of a Hugging Face model by layer number.

``LayerTap`` never asks the model for ``output_hidden_states``: it hooks the modules that produce the
requested layers (see :mod:`flexkd.adapters`). With ``columns`` a layer keeps only the selected columns
(``index_select`` inside the hook, so the full hidden state is freed as soon as the next block has read
it); with ``stop_after_deepest`` the forward pass is abandoned right after the deepest tapped layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from flexkd.adapters import HookSite, ModelAdapter, check_layer_number, get_adapter
from flexkd.distributed import end_early_forward


class _StopForward(Exception):
    """Raised from the deepest tap's hook to end the forward pass early; caught in ``LayerTap.run``."""


class CapturedLayers(dict):
    """Captured hidden states keyed by resolved layer number; negative numbers are accepted on lookup."""

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        self._adapter = adapter

    def __getitem__(self, layer: int) -> torch.Tensor:
        resolved = self._adapter.resolve_layer(layer)
        if not super().__contains__(resolved):
            raise KeyError(
                f"layer {layer} was not captured: it is not tapped, or run() has not been called"
            )
        return super().__getitem__(resolved)

    def __contains__(self, layer: object) -> bool:
        try:
            return super().__contains__(self._adapter.resolve_layer(layer))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False


class LayerTap:
    """Capture the hidden states of ``layers`` (HF ``hidden_states`` numbering) during ``model``'s forward.

    Args:
        model: a Hugging Face model (see :func:`flexkd.adapters.get_adapter`).
        layers: layer numbers, negative counting from the end.
        columns: optional ``{layer: index}``; such a layer keeps only ``hidden[..., index]``.
        stop_after_deepest: end the forward right after the deepest tapped layer; ``run`` then returns None.
        side: ``"encoder"`` or ``"decoder"`` stack of a seq2seq model (default: encoder).
        grad_leaf: replace the shallowest tapped hidden state in the forward by a detached copy that requires
            grad, so autograd records only the layers above it; ``torch.autograd.grad(loss, tap.hidden[L])``
            then back-propagates through nothing below. Used by scoring.

    Usage::

        with LayerTap(model, [-1]) as tap:
            outputs = tap.run(**batch)
            h = tap.hidden[-1]          # [B, T, H] (or [B, T, len(columns[-1])])
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        *,
        columns: Mapping[int, torch.Tensor] | None = None,
        stop_after_deepest: bool = False,
        side: str | None = None,
        grad_leaf: bool = False,
    ) -> None:
        self.model = model
        self.adapter = get_adapter(model, side=side)
        self.layers = _resolve_layers(self.adapter, layers)
        self.columns = _resolve_columns(self.adapter, self.layers, columns)
        self.stop_after_deepest = bool(stop_after_deepest)
        self.grad_leaf = bool(grad_leaf)
        self.hidden = CapturedLayers(self.adapter)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def side(self) -> str:
        return self.adapter.side

    def __enter__(self) -> LayerTap:
        if self._handles:
            raise RuntimeError("this LayerTap is already installed")
        try:
            for layer in self.layers:
                self._install(layer, self.adapter.site(layer))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._remove()

    def run(self, *args, **kwargs):
        """Call ``model(*args, **kwargs)``; its outputs, or ``None`` when the tap ended the forward early."""
        if not self._handles:
            raise RuntimeError("LayerTap.run must be called inside `with LayerTap(...) as tap:`")
        self.hidden.clear()
        try:
            outputs = self.model(*args, **kwargs)
        except _StopForward:
            end_early_forward(self.model)
            return None
        missing = [layer for layer in self.layers if layer not in self.hidden]
        if missing:
            raise RuntimeError(
                f"the forward pass did not reach layers {missing} of the {self.side}"
            )
        return outputs

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _install(self, layer: int, site: HookSite) -> None:
        if site.kind == "input":

            def pre_hook(module, args, kwargs):
                if args:
                    replaced = self._capture(layer, args[0])
                    return None if replaced is None else ((replaced, *args[1:]), kwargs)
                replaced = self._capture(layer, kwargs["hidden_states"])
                return None if replaced is None else (args, {**kwargs, "hidden_states": replaced})

            handle = site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:

            def hook(module, args, output):
                replaced = self._capture(layer, _hidden_of(output))
                return None if replaced is None else _with_hidden(output, replaced)

            handle = site.module.register_forward_hook(hook)
        self._handles.append(handle)

    def _capture(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Record ``hidden`` for ``layer``; returns the tensor that must replace it in the forward, if any."""
        replacement = None
        if self.grad_leaf and layer == self.layers[0]:
            hidden = replacement = hidden.detach().requires_grad_(True)
        index = self.columns.get(layer)
        if index is not None:
            if index.device != hidden.device:
                index = self.columns[layer] = index.to(hidden.device)
            self.hidden[layer] = hidden.index_select(-1, index)
        else:
            self.hidden[layer] = hidden
        if self.stop_after_deepest and layer == self.layers[-1]:
            raise _StopForward
        return replacement


def _hidden_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find the hidden state in a module output of type {type(output).__name__}"
    )


def _with_hidden(output, hidden: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return hidden
    if hasattr(output, "last_hidden_state"):
        output["last_hidden_state"] = hidden
        return output
    return type(output)((hidden, *output[1:]))


def _resolve_layers(adapter: ModelAdapter, layers: Sequence[int]) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        else:
            raise TypeError(f"layers must be a sequence of ints, got {type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError("layers must name at least one layer")
    return sorted({adapter.resolve_layer(check_layer_number(layer)) for layer in layers})


def _resolve_columns(
    adapter: ModelAdapter, layers: list[int], columns: Mapping[int, torch.Tensor] | None
) -> dict[int, torch.Tensor]:
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise TypeError(
            f"columns must be a mapping from layer to index tensor, got {type(columns).__name__}"
        )
    resolved = {}
    for layer, index in columns.items():
        key = adapter.resolve_layer(check_layer_number(layer, "columns key"))
        if key not in layers:
            raise ValueError(
                f"columns has layer {layer}, which is not among the tapped layers {layers}"
            )
        if key in resolved:
            raise ValueError(f"columns names layer {key} twice (as {layer} and as another number)")
        if (
            not isinstance(index, torch.Tensor)
            or index.dim() != 1
            or index.is_floating_point()
            or index.is_complex()
        ):
            raise TypeError(f"columns[{layer}] must be a 1-D integer tensor")
        width = adapter.layer_width(key)
        message = f"columns[{layer}] must be non-empty with values in [0, {width}), the layer's width"
        if index.numel() == 0:
            raise ValueError(message)
        try:  # checked on the index's device, read back to the host only on the CPU (raised there)
            torch._assert_async(((index >= 0) & (index < width)).all(), message)
        except RuntimeError:
            raise ValueError(message) from None
        resolved[key] = index.to(torch.int64)
    return resolved
