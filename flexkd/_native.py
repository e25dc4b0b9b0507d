"""Loads the compiled extension ``flexkd._C`` once and remembers why it is missing if it is."""

from __future__ import annotations

import functools
import warnings

import torch


@functools.cache
def load() -> object | None:
    """The ``flexkd._C`` module, or None when it was not built (see :func:`load_error`)."""
    try:
        from flexkd import _C
    except ImportError as err:
        _errors.append(f"{type(err).__name__}: {err}")
        return None
    _warn_if_torch_differs(_C)
    return _C


_errors: list[str] = []


def load_error() -> str | None:
    load()
    return _errors[0] if _errors else None


@functools.cache
def build_info() -> dict:
    module = load()
    return dict(module.build_info()) if module is not None else {}


def has_cuda_kernels() -> bool:
    return bool(build_info().get("cuda_kernels", False))


def _version_key(version: str | None) -> str | None:
    return version.split("+")[0] if version else version


def _warn_if_torch_differs(module) -> None:
    info = dict(module.build_info())
    built, running = info.get("torch_version"), torch.__version__
    if built and _version_key(built) != _version_key(running):
        warnings.warn(
            f"flexkd._C was built against torch {built} but torch {running} is running; "
            "rebuild flexkd (pip install --no-build-isolation .) if ops fail to load or misbehave.",
            RuntimeWarning,
            stacklevel=3,
        )
