"""What the selected teacher dims look like: are they simply the dims with the largest activations?

|grad x activation| grows with |activation|, so a selection can be dominated by a few high-magnitude
("outlier") dims. ``selection_profile`` measures, at the selected layer, how much of the hidden state's
energy the selected dims carry and how much the top-k by score overlaps the top-k by mean |activation|.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from flexkd.adapters import token_weights
from flexkd.taps import LayerTap


@torch.no_grad()
def selection_profile(
    teacher: nn.Module,
    selection,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    layer: int | None = None,
) -> dict[str, float]:
    """Statistics of the teacher's hidden state at ``layer`` (default: the selection's last) over ``batches``.

    Returns ``energy_share_selected`` (sum of h^2 over the selected dims / over all dims),
    ``energy_share_uniform`` (k / D, what a random choice would carry on average), ``mean_abs_ratio``
    (mean |h| of selected dims / of the others), ``overlap_with_top_abs`` (fraction of the selected dims
    that are also among the k dims of largest mean |h|) and ``mass_in_top_k`` (share of the score mass).
    """
    layer = selection.layers[-1] if layer is None else layer
    index = selection.index(layer)
    k = index.numel()
    abs_sum = energy = None
    tokens = 0.0
    with LayerTap(teacher, [layer]) as tap:
        adapter = tap.adapter
        for batch in batches:
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            tap.run(**inputs)
            hidden = tap.hidden[layer].float()
            weights = token_weights(
                batch, task=adapter.task, side=adapter.side, shape=tuple(hidden.shape[:2])
            ).to(hidden.dtype)
            flat, w = hidden.reshape(-1, hidden.shape[-1]), weights.reshape(-1, 1)
            batch_abs, batch_energy = (flat.abs() * w).sum(0), (flat.square() * w).sum(0)
            abs_sum = batch_abs if abs_sum is None else abs_sum + batch_abs
            energy = batch_energy if energy is None else energy + batch_energy
            tokens += float(w.sum())
    if abs_sum is None or tokens == 0:
        raise ValueError("batches: no token was seen")
    width = abs_sum.numel()
    selected = torch.zeros(width, dtype=torch.bool)
    selected[index] = True
    mean_abs = abs_sum / tokens
    top_abs = torch.topk(mean_abs, k).indices
    return {
        "layer": layer,
        "k": k,
        "hidden_size": width,
        "energy_share_selected": float(energy[selected].sum() / energy.sum()),
        "energy_share_uniform": k / width,
        "mean_abs_ratio": float(mean_abs[selected].mean() / mean_abs[~selected].mean())
        if k < width
        else 1.0,
        "overlap_with_top_abs": float(selected[top_abs].float().mean()),
        "mass_in_top_k": float(selection.mass_in_top_k(layer)),
    }


def profile_sentence(profile: dict[str, Any]) -> str:
    """One line on what the selected dims are (:func:`selection_profile`'s result)."""
    return (
        f"At layer {profile['layer']}, the top-{profile['k']} dims hold {100 * profile['mass_in_top_k']:.1f}% of the importance mass and "
        f"{100 * profile['energy_share_selected']:.1f}% of the hidden state's energy (k/D = "
        f"{100 * profile['energy_share_uniform']:.1f}%); their mean |activation| is "
        f"{profile['mean_abs_ratio']:.2f}x that of the other dims, and "
        f"{100 * profile['overlap_with_top_abs']:.0f}% of them are among the {profile['k']} dims of largest "
        "mean |activation|."
    )
