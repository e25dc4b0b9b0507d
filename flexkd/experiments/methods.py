"""The distillation methods the demo and the study compare, by name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One way of distilling: which feature term the ``Distiller`` adds, and which teacher dims Flex-KD keeps.

    ``which`` only matters for ``feature="flex"``: ``"top"`` is Flex-KD, ``"random"``/``"bottom"`` the
    selection ablation, which runs with the tuned knobs of its top-k method (``tuned_as``).
    """

    name: str
    label: str
    feature: str
    feature_loss: str = "mse"
    which: str = "top"
    tuned_as: str = ""

    def __post_init__(self) -> None:
        if not self.tuned_as:
            object.__setattr__(self, "tuned_as", self.name)

    @property
    def uses_selection(self) -> bool:
        return self.feature == "flex"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", "no feature KD", "none"),
        Method("projector", "projector (mse)", "projector"),
        Method("projector-corr", "projector (corr)", "projector", "corr"),
        Method("cka", "CKA", "cka"),
        Method("flex-mse", "Flex-KD (mse)", "flex", "mse"),
        Method("flex-corr", "Flex-KD (corr)", "flex", "corr"),
        *(
            Method(
                f"flex-{loss}-{which}",
                f"Flex-KD {loss}, {which}-k dims",
                "flex",
                loss,
                which,
                f"flex-{loss}",
            )
            for loss in ("mse", "corr")
            for which in ("random", "bottom")
        ),
    )
}

DEMO_METHODS = ("flex-corr", "projector-corr", "none")
STUDY_METHODS = (
    "none",
    "flex-corr",
    "projector-corr",
    "cka",
    "flex-mse",
    "projector",
)  # demo trio first
# Flex-KD with the loss the paper reports (corr): top-k is flex-corr itself, the ablation adds two selections
ABLATION_METHODS = ("flex-corr", "flex-corr-random", "flex-corr-bottom")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
