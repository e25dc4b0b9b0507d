"""The formulas a user writes for each op without flexkd: the baselines of the op benchmarks, run eagerly
and under ``torch.compile``. They are the plain one-liners (fp32 math, as the ops do), not flexkd's
reference: Inductor fuses them into the loops a user actually gets, so they are the honest bar.
``benchmarks/README.md`` shows them; the tests check that they compute the ops' values."""

from __future__ import annotations

import torch


def mse(s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``flex_feature_loss(s, t, idx, m, loss="mse")``: the masked mean of squared differences."""
    d = s.float() - t.index_select(1, idx).float()
    return ((d * d).sum(1) * m).sum() / (m.sum() * idx.numel())


def corr(s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, m: torch.Tensor,
         eps: float = 1e-8) -> torch.Tensor:
    """``flex_feature_loss(s, t, idx, m, loss="corr", eps=eps)``: one minus the weighted Pearson
    correlation of each selected column, averaged."""
    s, t = s.float(), t.index_select(1, idx).float()
    w = (m / m.sum())[:, None]
    sc, tc = s - (w * s).sum(0), t - (w * t).sum(0)
    cov = (w * sc * tc).sum(0)
    sd_s, sd_t = (w * sc * sc).sum(0).sqrt(), (w * tc * tc).sum(0).sqrt()
    return (1 - cov / (sd_s.clamp_min(eps) * sd_t.clamp_min(eps))).mean()


def importance(h: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``importance_scores(h, g, m)``: the masked column sums of ``|h * g|``."""
    return ((h.float() * g.float()).abs() * m[:, None]).sum(0)


FORMULAS = {"mse": mse, "corr": corr, "importance": importance}
