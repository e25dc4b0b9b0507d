"""The distillation methods the demo and the study compare, by name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One way of distilling: which feature term the ``Distiller`` adds, and which teacher dims Flex-KD keeps.

    ``which`` only matters for ``feature="flex"``: ``"top"`` is Flex-KD, ``"random"``/``"bottom"`` the
    selection ablation.
    """

    name: str
    label: str
    feature: str
    feature_loss: str = "mse"
    which: str = "top"

    @property
    def uses_selection(self) -> bool:
        return self.feature == "flex"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", "no feature KD", "none"),
        Method("projector", "projector (mse)", "projector"),
        Method("cka", "CKA", "cka"),
        Method("flex-mse", "Flex-KD (mse)", "flex", "mse"),
        Method("flex-corr", "Flex-KD (corr)", "flex", "corr"),
        Method("flex-mse-random", "Flex-KD mse, random-k dims", "flex", "mse", which="random"),
        Method("flex-mse-bottom", "Flex-KD mse, bottom-k dims", "flex", "mse", which="bottom"),
    )
}

DEMO_METHODS = ("flex-mse", "projector", "none")
STUDY_METHODS = ("none", "flex-mse", "projector", "cka", "flex-corr")  # the demo trio first
# top-k is flex-mse itself; the ablation adds the other two selections
ABLATION_METHODS = ("flex-mse", "flex-mse-random", "flex-mse-bottom")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
