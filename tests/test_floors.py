"""The torch floor, Python floor and C++ standard are stated once (tools/build_config.py) and every
consumer agrees with it."""

import importlib.util
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _build_config():
    spec = importlib.util.spec_from_file_location("build_config", ROOT / "tools" / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", text).group(0).split("."))


def test_pyproject_states_the_floors_of_build_config():
    config = _build_config()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.findall(r'"torch>=([\d.]+)"', pyproject) == [config.TORCH_FLOOR]
    assert re.findall(r'requires-python = ">=([\d.]+)"', pyproject) == [config.PYTHON_FLOOR]


def test_both_native_builds_use_the_one_cxx_standard(tmp_path):
    config = _build_config()
    assert f"-std=c++{config.CXX_STANDARD}" in config._GNU_CXX_FLAGS
    assert f"/std:c++{config.CXX_STANDARD}" in config._MSVC_CXX_FLAGS
    out = tmp_path / "config.cmake"
    config.main(["--cmake", str(out), "--cuda", "off"])
    assert f"set(FLEXKD_CXX_STANDARD {config.CXX_STANDARD})" in out.read_text()
    cmakelists = (ROOT / "CMakeLists.txt").read_text()
    assert "CXX_STANDARD ${FLEXKD_CXX_STANDARD}" in cmakelists
    assert "CUDA_STANDARD ${FLEXKD_CXX_STANDARD}" in cmakelists
    assert not re.search(r"(CXX|CUDA)_STANDARD \d", cmakelists)


def test_this_environment_meets_the_floors():
    config = _build_config()
    assert _version(torch.__version__) >= _version(config.TORCH_FLOOR)
    assert sys.version_info[:2] >= _version(config.PYTHON_FLOOR)
    assert hasattr(torch, "accelerator")  # used by flexkd.training.make_accelerator
