"""Triton backend of the flexkd ops (shipped as ``flexkd.kernels``).

Importing it registers ``flexkd::feature_loss_fwd_triton``, ``flexkd::importance_scores_acc_triton`` and
``flexkd::linear_logit_kd_fwd_triton``
(``torch.library.triton_op``, so ``torch.compile`` traces into the kernels). It raises ImportError when
Triton is not installed. The kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1``
was set before this import.
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
except ImportError as err:
    raise ImportError(f"the Triton backend of flexkd needs the 'triton' package ({err})") from err
if not hasattr(torch.library, "triton_op"):
    raise ImportError(
        f"the Triton backend of flexkd needs torch>=2.6 (torch.library.triton_op), got {torch.__version__}"
    )

from .feature_loss import feature_loss_fwd_triton
from .importance import importance_scores_acc_triton
from .linear_logit_kd import linear_logit_kd_fwd_triton

__all__ = [
    "feature_loss_fwd_triton",
    "importance_scores_acc_triton",
    "linear_logit_kd_fwd_triton",
]
