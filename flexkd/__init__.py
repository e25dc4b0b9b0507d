"""flexkd: Flex-KD feature distillation with fused kernels.

``flexkd.ops`` holds the three ops; ``flexkd.score`` and ``flexkd.DimensionSelection`` the scoring and
selection API (imported lazily, so ``import flexkd.ops`` does not pull in transformers).
"""

from flexkd._version import __version__

__all__ = ["__version__", "score", "DimensionSelection"]


def __getattr__(name):
    if name == "score":
        from flexkd.scoring import score

        return score
    if name == "DimensionSelection":
        from flexkd.selection import DimensionSelection

        return DimensionSelection
    raise AttributeError(f"module 'flexkd' has no attribute {name!r}")
