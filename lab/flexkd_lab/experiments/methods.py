"""The distillation methods the demo and the study compare, by name."""

from __future__ import annotations

from dataclasses import dataclass

from flexkd.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """One way of distilling: which feature term the ``Distiller`` adds, and which teacher dims Flex-KD keeps.

    ``which`` and ``stat`` only matter for ``feature="flex"``: ``"top"`` is Flex-KD, ``"random"``/``"bottom"``
    the selection ablation, which runs with the tuned knobs of its top-k method (``tuned_as``); ``stat`` is
    the score the dims are ranked by (``flexkd.score(..., stat=...)``).
    """

    name: str
    label: str
    feature: str
    feature_loss: str = "mse"
    which: str = "top"
    tuned_as: str = ""
    stat: str = "grad_x_act"

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
        # flexkd's variant, not the paper's: Flex-KD's selected dims, compared by linear CKA (rotation-
        # invariant, like the CKA baseline that matched Flex-KD corr in the first study) instead of per dim
        Method("flex-cka", "Flex-KD dims + CKA (flexkd's variant)", "flex", "cka"),
        # the same selection scored by |grad| instead of |grad x act|, at Flex-KD corr's tuned knobs
        Method(
            "flex-corr-grad",
            "Flex-KD (corr), |grad| scores",
            "flex",
            "corr",
            "top",
            "flex-corr",
            "grad",
        ),
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
    "flex-corr-grad",
    "flex-corr-random",
    "flex-corr-bottom",
    "projector",
    "projector-corr",
    "cka",
)
# the study's decisive comparisons (a - b), Holm-corrected as one family
DECISIVE_COMPARISONS = (
    ("flex-corr", "none"),
    ("flex-corr", "projector-corr"),
    ("flex-corr", "projector"),
    ("flex-corr", "cka"),
    ("flex-corr", "flex-corr-random"),
    ("flex-corr", "flex-corr-bottom"),
)


# flexkd's variant against its two parents: a separate Holm family, reported only when it was run
# (`flexkd-lab study --methods ... flex-cka`), so adding it never changes the decisive family's p-values
VARIANT_COMPARISONS = (
    ("flex-cka", "cka"),
    ("flex-cka", "flex-corr"),
)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method: expected one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
