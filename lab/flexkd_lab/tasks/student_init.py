"""Initialising a narrow student's embeddings from a wide teacher's.

``teacher_pca``: the teacher's word-embedding matrix is centred and its top-``h`` principal
directions ``P`` (``D x h``) found; the student's word, position and token-type embeddings
become the teacher's times ``P``. The student starts with the teacher's lexical geometry in
its ``h`` most informative directions and everything above the embeddings random. The same
initial student is used for every distillation method, so comparisons stay fair."""

from __future__ import annotations

import torch
from torch import nn

EMBEDDING_INITS = ("random", "teacher_pca")


def _extra_embeddings(model: nn.Module) -> dict[str, nn.Embedding]:
    """Position/token-type embedding tables next to the word embeddings (BERT, GPT-2 names)."""
    found = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("position_embeddings", "token_type_embeddings", "wpe") and isinstance(
            module, nn.Embedding
        ):
            found[leaf] = module
    return found


@torch.no_grad()
def principal_directions(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The top-``k`` principal directions (``D x k``, orthonormal columns) of the rows of
    ``weight``, from the eigendecomposition of their ``D x D`` covariance."""
    if not 0 < k <= weight.shape[1]:
        raise ValueError(f"k: expected 1..{weight.shape[1]}, got {k}")
    centred = weight.float() - weight.float().mean(0, keepdim=True)
    covariance = (centred.T @ centred).double()
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # a small eigh: threading only adds overhead (seconds when CPUs are busy)
    try:
        _, vectors = torch.linalg.eigh(covariance)  # eigenvalues ascending
    finally:
        torch.set_num_threads(threads)
    return vectors[:, -k:].flip(-1).to(weight.dtype)


@torch.no_grad()
def init_embeddings_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Set the student's embedding tables to the teacher's projected on its principal directions."""
    s_words, t_words = student.get_input_embeddings(), teacher.get_input_embeddings()
    if s_words.weight.shape[0] != t_words.weight.shape[0]:
        raise ValueError(
            f"student: vocabulary {s_words.weight.shape[0]} differs from the teacher's {t_words.weight.shape[0]}"
        )
    projection = principal_directions(t_words.weight, s_words.weight.shape[1])
    s_words.weight.copy_(t_words.weight @ projection)
    s_extra, t_extra = _extra_embeddings(student), _extra_embeddings(teacher)
    for name, table in s_extra.items():
        if name in t_extra:
            rows = min(table.weight.shape[0], t_extra[name].weight.shape[0])
            table.weight[:rows].copy_(t_extra[name].weight[:rows] @ projection)
