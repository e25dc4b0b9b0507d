#!/usr/bin/env bash
# Builds the CPU wheel (`python -m build --wheel --no-isolation`, against the torch installed here),
# installs it into a fresh virtual environment (system site-packages visible, for torch) and, from
# outside the source tree, proves that the installed package carries flexkd._C and flexkd.kernels and
# that the ops run: the C++ kernels against the torch reference, and the Triton kernels under
# TRITON_INTERPRET=1. Usage: bash .ci/wheel_smoke.sh   (FLEXKD_WHEEL_DIR keeps the wheel there)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
WORK="$(mktemp -d /tmp/flexkd-wheel-smoke.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
DIST="${FLEXKD_WHEEL_DIR:-$WORK/dist}"
START=$SECONDS
step() { printf '[wheel_smoke %4ds] %s\n' "$((SECONDS - START))" "$*"; }

step "building the CPU wheel"
FLEXKD_BUILD_CUDA=0 "$PY" -m build --wheel --no-isolation --outdir "$DIST" "$ROOT" >"$WORK/build.log" 2>&1 ||
  { tail -n 60 "$WORK/build.log" >&2; echo "wheel_smoke: the wheel build failed" >&2; exit 1; }
WHEEL="$(ls -t "$DIST"/flexkd-*.whl | head -n1)"
step "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
"$PY" - "$WHEEL" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
required = ["flexkd/__init__.py", "flexkd/ops/__init__.py", "flexkd/kernels/__init__.py"]
missing = [n for n in required if n not in names]
assert not missing, f"missing from the wheel: {missing}"
assert any(n.startswith("flexkd/_C") and n.endswith((".so", ".pyd")) for n in names), "no flexkd/_C in the wheel"
assert not any(n.startswith("kernels/") for n in names), "kernels/ must ship as flexkd.kernels only"
print(f"wheel holds {len(names)} files, flexkd/_C and flexkd/kernels among them")
EOF

step "installing it into a fresh virtual environment"
"$PY" -m venv --system-site-packages "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --no-deps --no-index "$WHEEL"

step "smoke test from outside the source tree"
cd "$WORK"
FLEXKD_SOURCE="$ROOT" TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 "$WORK/venv/bin/python" -W ignore - <<'EOF'
import os
from pathlib import Path

import torch

import flexkd
import flexkd._C
import flexkd.kernels
from flexkd.ops import flex_feature_loss, importance_scores, reference

source = Path(os.environ["FLEXKD_SOURCE"]).resolve()
for module in (flexkd, flexkd._C, flexkd.kernels):
    where = Path(module.__file__).resolve()
    assert source not in where.parents, f"{module.__name__} was imported from the source tree: {where}"
    print(f"{module.__name__}: {where}")
print("build_info:", {k: v for k, v in flexkd._C.build_info().items() if k in ("torch_version", "cpu_isa", "cuda_kernels")})

student, teacher = torch.randn(37, 12, requires_grad=True), torch.randn(37, 50)
index, mask = torch.randperm(50)[:12], torch.rand(37)
for loss in ("mse", "corr"):
    expected = reference.flex_feature_loss(student, teacher, index, mask, loss=loss)
    for backend in ("cpu", "triton"):
        value = flex_feature_loss(student, teacher, index, mask, loss=loss, backend=backend)
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)
        (grad,) = torch.autograd.grad(value, student)
        (expected_grad,) = torch.autograd.grad(expected, student, retain_graph=True)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
        print(f"flex_feature_loss {loss} via {backend}: {value.item():.6f} (reference {expected.item():.6f})")
for backend in ("cpu", "triton"):
    scores = importance_scores(teacher, teacher * 0.5, mask, backend=backend)
    torch.testing.assert_close(scores, reference.importance_scores(teacher, teacher * 0.5, mask))
    print(f"importance_scores via {backend}: ok")
EOF
step "OK: the wheel installs and its native and Triton kernels run outside the source tree"
