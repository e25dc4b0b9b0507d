"""flexkd: Flex-KD feature distillation with fused kernels.

The public API, each name imported on first use (so ``import flexkd`` loads neither transformers nor
the kernels)::

    flexkd.flex_feature_loss(student, teacher, index, mask)   # the fused op (flexkd.ops)
    sel = flexkd.score(teacher, batches, layers=[-1], k=128)   # a flexkd.DimensionSelection
    distiller = flexkd.Distiller(teacher, student, selection=sel)
    flexkd.FlexKDTrainer(distiller, args=..., train_dataset=...)  # inside a Hugging Face Trainer
    flexkd.train(flexkd.Config(...))                             # or the library's own loop

User errors are :class:`flexkd.FlexKDError` subclasses (``flexkd.errors``).
"""

import importlib as _importlib

from flexkd import errors as _errors
from flexkd._version import __version__
from flexkd.errors import *  # noqa: F403  (the FlexKDError hierarchy)

# name -> (module, attribute): loaded on first access by __getattr__
_LAZY = {
    "flex_feature_loss": ("flexkd.ops", "flex_feature_loss"),
    "score": ("flexkd.scoring", "score"),
    "DimensionSelection": ("flexkd.selection", "DimensionSelection"),
    "Distiller": ("flexkd.distill", "Distiller"),
    "FlexKDTrainer": ("flexkd.trainer", "FlexKDTrainer"),
    "train": ("flexkd.training.loop", "train"),
    "Config": ("flexkd.config", "Config"),
    "load_config": ("flexkd.config", "load_config"),
}

__all__ = ["__version__", *_LAZY, *_errors.__all__]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'flexkd' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    value = getattr(_importlib.import_module(module_name), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
