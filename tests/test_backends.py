"""Backend resolution: auto, FLEXKD_BACKEND, explicit requests that cannot run, one warning on fallback."""

import warnings

import pytest
import torch

from flexkd import _native
from flexkd.ops import _backends, flex_feature_loss, resolve_backend

native_built = _native.load() is not None


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    monkeypatch.setattr(_backends, "_warned", set())


def test_auto_on_cpu_uses_the_compiled_kernels_when_built():
    assert _backends.resolve("auto", "cpu", "op") == ("cpu" if native_built else "torch")


def test_env_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(_backends.ENV_VAR, "torch")
    assert _backends.resolve("auto", "cpu", "op") == "torch"
    if native_built:
        assert _backends.resolve("cpu", "cpu", "op") == "cpu"


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(_backends.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="FLEXKD_BACKEND"):
        _backends.resolve("auto", "cpu", "op")


def test_explicit_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available.*CUDA tensors"):
        _backends.resolve("cuda", "cpu", "flex_feature_loss")
    with pytest.raises(RuntimeError, match="not available"):
        _backends.resolve("cpu", "cuda", "flex_feature_loss")


def test_env_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv(_backends.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="not available"):
        flex_feature_loss(torch.randn(2, 3), torch.randn(2, 5), torch.tensor([0, 1, 2]))


def test_automatic_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_backends, "unavailable_reason", lambda backend, device: f"{backend} missing")
    with pytest.warns(RuntimeWarning, match="falls back to the pure-PyTorch backend.*cpu missing"):
        assert _backends.resolve("auto", "cpu", "flex_feature_loss") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.resolve("auto", "cpu", "flex_feature_loss") == "torch"


def test_cuda_tensors_fall_back_in_order(monkeypatch):
    available = {"cuda": "not built", "triton": None}
    monkeypatch.setattr(_backends, "unavailable_reason", lambda backend, device: available.get(backend))
    assert _backends.resolve("auto", "cuda", "op") == "triton"
    available["triton"] = "no triton"
    with pytest.warns(RuntimeWarning, match="cuda: not built; triton: no triton"):
        assert _backends.resolve("auto", "cuda", "op") == "torch"


def test_public_resolver():
    assert resolve_backend("torch", "cpu", "importance_scores") == "torch"
