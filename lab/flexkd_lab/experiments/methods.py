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
        # the selection ablation again with the feature term at weight 1 (ABLATION_WEIGHT_1 in budget.py)
        *(
            Method(
                f"flex-corr-w1{suffix}",
                f"Flex-KD corr{label}, feature weight 1",
                "flex",
                "corr",
                which,
                "flex-corr-w1",
            )
            for which, suffix, label in (
                ("top", "", ""),
                ("random", "-random", ", random-k dims"),
                ("bottom", "-bottom", ", bottom-k dims"),
            )
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
# Flex-KD with the loss the paper reports (corr): top-k is flex-corr itself, the ablation adds two selections;
# then all three with the feature term at weight 1 instead of the tuned 0.1, where it is a larger share of the loss
ABLATION_METHODS = (
    "flex-corr",
    "flex-corr-random",
    "flex-corr-bottom",
    "flex-corr-w1",
    "flex-corr-w1-random",
    "flex-corr-w1-bottom",
)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
