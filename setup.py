"""Builds flexkd with its native extension ``flexkd._C`` (sources and flags: tools/build_config.py).

Build against the installed torch: ``pip install -e . --no-build-isolation`` or
``python -m build --wheel --no-isolation``. CUDA kernels are added when torch has CUDA and a toolkit is
found (``FLEXKD_BUILD_CUDA=0`` turns them off; ``FLEXKD_CUDA_ARCH_LIST`` picks architectures, default
``8.0;9.0``; ``MAX_JOBS`` bounds compile parallelism).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

import build_config  # noqa: E402




def _extension():
    from torch.utils import cpp_extension

    with_cuda, why = build_config.cuda_wanted()
    print(f"flexkd: building flexkd._C {'with' if with_cuda else 'without'} CUDA ({why})")
    defines = [f"-D{d}" for d in build_config.definitions(with_cuda)]
    compile_args = {"cxx": build_config.cxx_flags() + defines}
    sources = build_config.cpu_sources()
    kind = cpp_extension.CppExtension
    if with_cuda:
        compile_args["nvcc"] = build_config.nvcc_flags() + defines
        sources = sources + build_config.cuda_sources()
        kind = cpp_extension.CUDAExtension
    return kind(
        name=build_config.EXTENSION_NAME,
        sources=sources,
        include_dirs=[str(ROOT / d) for d in build_config.INCLUDE_DIRS],
        depends=build_config.headers(),
        extra_compile_args=compile_args,
        extra_link_args=build_config.link_flags(),
    )


def _build_ext():
    from torch.utils import cpp_extension

    return cpp_extension.BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())


os.chdir(ROOT)  # setuptools wants source paths relative to setup.py
setup(
    packages=find_packages(where=str(ROOT), include=["flexkd", "flexkd.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _build_ext()},
    zip_safe=False,
)
