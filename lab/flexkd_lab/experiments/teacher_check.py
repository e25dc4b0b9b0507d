"""The paper's teacher check: zero chosen hidden dims of the teacher at one layer and re-evaluate it.

If the scores mean what Flex-KD assumes, zeroing the k highest-scored dims should hurt the teacher far
more than zeroing k random dims, the k lowest-scored, or half of its dims taken from the lowest-scored end. The study runs the
check at every layer, which shows where in the teacher the scores carry that meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from flexkd.adapters import get_adapter
from flexkd.taps import _hidden_of, _with_hidden


class ZeroDims:
    """Context manager: while installed, ``model``'s hidden state at ``layer`` has ``dims`` set to 0.

    ``layer`` follows HF ``hidden_states`` numbering (negative from the end) of the ``side`` stack; the
    hook sits where :class:`flexkd.taps.LayerTap` would capture that layer, so everything above it sees
    the zeroed state.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int,
        dims: torch.Tensor | Sequence[int],
        *,
        side: str | None = None,
    ):
        self.adapter = get_adapter(model, side=side)
        self.layer = self.adapter.resolve_layer(layer)
        width = self.adapter.layer_width(self.layer)
        dims = torch.as_tensor(dims)
        if dims.dim() != 1 or dims.is_floating_point() or dims.is_complex():
            raise TypeError("dims must be a 1-D sequence of integer dimension numbers")
        dims = dims.to(torch.int64)
        if dims.numel() and (int(dims.min()) < 0 or int(dims.max()) >= width):
            raise ValueError(f"dims must lie in [0, {width}), the width of layer {self.layer}")
        if dims.unique().numel() != dims.numel():
            raise ValueError("dims must not repeat a dimension")
        self.dims = dims
        self._handle = None

    def _zeroed(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.index_fill(-1, self.dims.to(hidden.device), 0.0)

    def __enter__(self) -> ZeroDims:
        if self._handle is not None:
            raise RuntimeError("this ZeroDims is already installed")
        site = self.adapter.site(self.layer)
        if site.kind == "input":

            def pre_hook(module, args, kwargs):
                if args:
                    return (self._zeroed(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self._zeroed(kwargs["hidden_states"])}

            self._handle = site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:

            def hook(module, args, output):
                return _with_hidden(output, self._zeroed(_hidden_of(output)))

            self._handle = site.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def teacher_check_conditions(
    scores: torch.Tensor, k: int, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The dims each condition zeroes: none, the top-k, k random dims, the bottom-k (the k lowest-scored),
    and the lowest-scored half when that is not the bottom-k already (k = width / 2, the 2:1 pair)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    width = scores.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        raise ValueError(f"k must be an int in [1, {width}], got {k!r}")
    order = torch.argsort(scores, descending=True, stable=True)
    generator = torch.Generator().manual_seed(seed)
    conditions = {
        "intact": torch.empty(0, dtype=torch.int64),
        f"zero top-{k}": order[:k].sort().values,
        f"zero random {k}": torch.randperm(width, generator=generator)[:k].sort().values,
        f"zero bottom-{k}": order[width - k :].sort().values,
    }
    if width // 2 != k:
        conditions[f"zero lowest {width // 2} (half)"] = order[width - width // 2 :].sort().values
    return conditions


def run_teacher_check(
    teacher: nn.Module,
    scores: Mapping[int, torch.Tensor],
    k: int,
    evaluate: Callable[[nn.Module], dict[str, float]],
    *,
    side: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """``evaluate(teacher)`` intact, then under each zeroing of :func:`teacher_check_conditions` at every
    layer of ``scores`` (``{layer: that layer's scores}``); one row per (layer, condition), ``layer`` None
    for the intact teacher."""
    if not scores:
        raise ValueError("scores: need the scores of at least one layer")
    rows = [{"layer": None, "condition": "intact", "dims_zeroed": 0, **evaluate(teacher)}]
    for layer, layer_scores in scores.items():
        for condition, dims in teacher_check_conditions(layer_scores, k, seed=seed).items():
            if not dims.numel():
                continue  # the intact teacher, evaluated once above
            with ZeroDims(teacher, layer, dims, side=side):
                metrics = evaluate(teacher)
            rows.append(
                {
                    "layer": layer,
                    "condition": condition,
                    "dims_zeroed": int(dims.numel()),
                    **metrics,
                }
            )
    return rows
