"""The one description of the native build: sources, include dirs, flags and definitions.

``setup.py`` imports it; ``CMakeLists.txt`` runs ``python tools/build_config.py --cmake FILE`` and includes
the file it writes. Change the build here, never in either consumer.

CUDA is compiled in when torch was built with CUDA, a CUDA toolkit (``CUDA_HOME``/nvcc) is found and
``FLEXKD_BUILD_CUDA`` is not ``"0"``. ``FLEXKD_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``) picks the
architectures; ``MAX_JOBS`` bounds compile parallelism (read by torch's build).
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EXTENSION_NAME = "flexkd._C"

# The floors, stated here once. TORCH_FLOOR is the oldest torch CI builds and tests against (CPU torch
# 2.13 for the tests, CUDA torch 2.14 for the nvcc build); pyproject's `torch>=` must equal it (a test
# checks). The code needs at least torch.accelerator (2.6) and C++20 (std::bit_cast in the CPU engine)
# with the torch.library headers of recent torch; no older torch is tested, so none is promised.
TORCH_FLOOR = "2.13"
PYTHON_FLOOR = "3.10"
CXX_STANDARD = 20

# The module (schemas + build_info), the feature loss's autograd kernel, the torch-facing CPU ops and
# their reused gradient memory, runtime ISA selection and one translation unit per instruction set that
# the same engine header is compiled for.
CPU_SOURCES = [
    "csrc/module.cpp",
    "csrc/feature_loss_autograd.cpp",
    "csrc/cpu/ops_cpu.cpp",
    "csrc/cpu/gradient_buffers.cpp",
    "csrc/cpu/isa.cpp",
    "csrc/cpu/kernels_baseline.cpp",
    "csrc/cpu/kernels_avx2.cpp",
    "csrc/cpu/kernels_avx512.cpp",
]
CUDA_SOURCE_PATTERNS = ["csrc/cuda/*.cu", "csrc/cuda/*.cpp"]
# Headers the sources include: a change to any of them rebuilds the extension.
HEADER_PATTERNS = ["csrc/**/*.h", "csrc/**/*.cuh"]
INCLUDE_DIRS = ["csrc/include", "csrc"]

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

# nvcc gets -std from torch (it refuses a second -std); CMake sets CUDA_STANDARD from CXX_STANDARD.
# Portable code only: the wider instruction sets come from the per-ISA translation units, chosen at
# run time. fp-contract=off keeps results independent of whether the ISA has FMA.
_GNU_CXX_FLAGS = [f"-std=c++{CXX_STANDARD}", "-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wextra",
                  "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
_GNU_LINK_FLAGS = ["-fopenmp"]
_MSVC_CXX_FLAGS = [f"/std:c++{CXX_STANDARD}", "/O2", "/openmp", "/fp:precise"]
_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def _is_msvc() -> bool:
    return sys.platform == "win32"


def cpu_sources() -> list[str]:
    return list(CPU_SOURCES)


def cuda_sources() -> list[str]:
    found: list[str] = []
    for pattern in CUDA_SOURCE_PATTERNS:
        found += sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))
    return [p.replace(os.sep, "/") for p in found]


def headers() -> list[str]:
    found = {os.path.relpath(p, ROOT) for pattern in HEADER_PATTERNS
             for p in glob.glob(str(ROOT / pattern), recursive=True)}
    return sorted(p.replace(os.sep, "/") for p in found)


def cxx_flags() -> list[str]:
    return list(_MSVC_CXX_FLAGS if _is_msvc() else _GNU_CXX_FLAGS)


def link_flags() -> list[str]:
    return [] if _is_msvc() else list(_GNU_LINK_FLAGS)


def cuda_arch_list() -> list[str]:
    raw = os.environ.get("FLEXKD_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    archs = [a.strip() for a in raw.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    for arch in archs:
        digits = arch.removesuffix("+PTX").replace(".", "")
        if not digits.isdigit():
            raise ValueError(f"FLEXKD_CUDA_ARCH_LIST: cannot read architecture {arch!r} in {raw!r}")
    return archs


def nvcc_flags() -> list[str]:
    flags = list(_NVCC_FLAGS)
    for arch in cuda_arch_list():
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def definitions(with_cuda: bool) -> list[str]:
    """Preprocessor definitions (NAME or NAME=VALUE) shared by every source."""
    return ["FLEXKD_WITH_CUDA=1"] if with_cuda else []


def cuda_wanted() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why (for the build log and ``build_info``)."""
    if os.environ.get("FLEXKD_BUILD_CUDA", "") == "0":
        return False, "FLEXKD_BUILD_CUDA=0"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not cuda_sources():
        return False, "no sources under csrc/cuda"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {cpp_extension.CUDA_HOME}"


def _cmake_list(name: str, values: list[str]) -> str:
    quoted = " ".join(f'"{v}"' for v in values)
    return f"set({name} {quoted})\n"


def cmake_text(with_cuda: bool) -> str:
    return "".join([
        "# Generated by tools/build_config.py; do not edit.\n",
        _cmake_list("FLEXKD_CPU_SOURCES", cpu_sources()),
        _cmake_list("FLEXKD_CUDA_SOURCES", cuda_sources() if with_cuda else []),
        _cmake_list("FLEXKD_INCLUDE_DIRS", INCLUDE_DIRS),
        _cmake_list("FLEXKD_CXX_FLAGS", cxx_flags()),
        _cmake_list("FLEXKD_LINK_FLAGS", link_flags()),
        _cmake_list("FLEXKD_NVCC_FLAGS", [f for f in nvcc_flags() if not f.startswith("-gencode")]),
        _cmake_list("FLEXKD_CUDA_ARCHITECTURES",
                    [a.removesuffix("+PTX").replace(".", "") for a in cuda_arch_list()]),
        _cmake_list("FLEXKD_DEFINITIONS", definitions(with_cuda)),
        f"set(FLEXKD_WITH_CUDA {'ON' if with_cuda else 'OFF'})\n",
        f"set(FLEXKD_CXX_STANDARD {CXX_STANDARD})\n",
    ])


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cmake", metavar="FILE", help="write CMake set() commands to FILE")
    parser.add_argument("--cuda", choices=("auto", "on", "off"), default="auto",
                        help="compile CUDA sources (auto: as setup.py decides)")
    args = parser.parse_args(argv)
    if args.cuda == "auto":
        with_cuda, why = cuda_wanted()
    else:
        with_cuda, why = args.cuda == "on", f"--cuda {args.cuda}"
    if args.cmake:
        _write_if_changed(Path(args.cmake), cmake_text(with_cuda))
    else:
        print(f"platform: {platform.platform()}")
        print(f"cuda: {with_cuda} ({why})")
        print(f"cpu sources: {' '.join(cpu_sources())}")
        print(f"cuda sources: {' '.join(cuda_sources())}")
        print(f"cxx flags: {' '.join(cxx_flags())}")
        print(f"floors: torch>={TORCH_FLOOR}, python>={PYTHON_FLOOR}, C++{CXX_STANDARD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
