"""Where each hidden state of a model comes from: the adapter a tap installs its hooks through.

Layer numbers follow Hugging Face ``hidden_states``: layer 0 is the input of the first block (the
embedding output), layer ``i`` for ``0 < i < N`` the output of block ``i - 1``, and layer ``N`` the
stack's final hidden state, i.e. the output of the last module that runs after the blocks (the final
norm, OPT's ``project_out``) or, when there is none, of the last block.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class HookSite:
    """The module whose input (``kind="input"``) or output (``kind="output"``) is a layer's hidden state.

    An input is the module's first positional argument (or its ``hidden_states`` keyword); an output is the
    module's return value, its first element when it returns a tuple, or its ``last_hidden_state`` when it
    returns a model output.
    """

    module: nn.Module
    kind: Literal["input", "output"]


def check_layer_number(layer: object, name: str = "layer") -> int:
    """``layer`` as a Python int; bools and non-integers raise ``TypeError`` naming ``name``."""
    if not isinstance(layer, bool):
        try:
            return operator.index(layer)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {type(layer).__name__} {layer!r}")


class ModelAdapter:
    """One stack of blocks of a model (the encoder or the decoder of a seq2seq model, else the only one).

    Attributes:
        model_type: ``config.model_type`` of the model.
        side: which stack this adapter addresses (``"encoder"`` or ``"decoder"``).
        sides: the stacks the model has.
        num_layers: number of blocks; ``hidden_states`` has ``num_layers + 1`` entries.
        hidden_size: width of every layer's hidden state except possibly the last (see ``layer_width``).
        task: what the model's labels mean for masking (``flexkd.adapters.masks.TASKS``), or ``None``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        model_type: str,
        side: str,
        sides: tuple[str, ...],
        blocks: list[nn.Module],
        final: nn.Module | None,
        hidden_size: int,
        final_width: int | None = None,
        task: str | None = None,
        family: str = "generic",
    ) -> None:
        if not blocks:
            raise ValueError(
                f"model: found no transformer blocks in the {side} of {type(model).__name__}"
            )
        self.model = model
        self.model_type = model_type
        self.side = side
        self.sides = sides
        self.blocks = blocks
        self.final = final
        self.num_layers = len(blocks)
        self.hidden_size = int(hidden_size)
        self.final_width = int(final_width) if final_width is not None else self.hidden_size
        self.task = task
        self.family = family

    @property
    def is_encoder_decoder(self) -> bool:
        return len(self.sides) > 1

    def resolve_layer(self, layer: int) -> int:
        """``layer`` in ``[0, num_layers]``; negative numbers count from the end as in Python."""
        layer = check_layer_number(layer)
        n = self.num_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(
                f"layer {layer} is out of range for the {self.side} of this {self.model_type} model: "
                f"it has {n} layers, so layer must be in [{-(n + 1)}, {n}]"
            )
        return layer % (n + 1)

    def layer_width(self, layer: int) -> int:
        """Width of layer ``layer``'s hidden state (the last layer may be projected, as in OPT-350m)."""
        return (
            self.final_width if self.resolve_layer(layer) == self.num_layers else self.hidden_size
        )

    def site(self, layer: int) -> HookSite:
        """Where layer ``layer``'s hidden state can be captured with a hook."""
        layer = self.resolve_layer(layer)
        if layer == 0:
            return HookSite(self.blocks[0], "input")
        if layer == self.num_layers and self.final is not None:
            return HookSite(self.final, "output")
        return HookSite(self.blocks[layer - 1], "output")

    def __repr__(self) -> str:
        return (
            f"ModelAdapter(model_type={self.model_type!r}, family={self.family!r}, side={self.side!r}, "
            f"num_layers={self.num_layers}, hidden_size={self.hidden_size}, task={self.task!r})"
        )
