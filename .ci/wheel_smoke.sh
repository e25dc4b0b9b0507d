#!/usr/bin/env bash
# Builds both wheels (`python -m build --wheel --no-isolation`, against the torch installed here): the
# library (flexkd, CPU) and the lab (flexkd-lab, lab/). Checks what each holds (the library: flexkd._C
# and flexkd.kernels, no data set, no lab code, no hard matplotlib; the lab: the bundled snapshot and the
# entry points), then installs them one after the other into a fresh virtual environment (this Python's
# site-packages visible, for torch, but not the project's own editable installs) and, from outside the
# source tree, proves that the library alone works (`import flexkd`, `flexkd info`, the C++ and Triton
# kernels against the torch reference, no demo or study subcommand) and that the lab adds `flexkd demo` /
# `flexkd study` through its entry points and reads its bundled data.
# Usage: bash .ci/wheel_smoke.sh   (FLEXKD_WHEEL_DIR keeps the wheels there)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
WORK="$(mktemp -d /tmp/flexkd-wheel-smoke.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
DIST="${FLEXKD_WHEEL_DIR:-$WORK/dist}"
START=$SECONDS
step() { printf '[wheel_smoke %4ds] %s\n' "$((SECONDS - START))" "$*"; }

build_wheel() {  # build_wheel <source dir> <log name>
  "$PY" -m build --wheel --no-isolation --outdir "$DIST" "$1" >"$WORK/$2.log" 2>&1 ||
    { tail -n 60 "$WORK/$2.log" >&2; echo "wheel_smoke: the $2 wheel build failed" >&2; exit 1; }
}

step "building the library's CPU wheel"
FLEXKD_BUILD_CUDA=0 build_wheel "$ROOT" flexkd
WHEEL="$(ls -t "$DIST"/flexkd-[0-9]*.whl | head -n1)"
step "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
step "building the lab's wheel"
build_wheel "$ROOT/lab" flexkd-lab
LAB_WHEEL="$(ls -t "$DIST"/flexkd_lab-*.whl | head -n1)"
step "built $(basename "$LAB_WHEEL") ($(du -h "$LAB_WHEEL" | cut -f1))"

"$PY" - "$WHEEL" "$LAB_WHEEL" <<'EOF'
import sys
import zipfile


def contents(path):
    wheel = zipfile.ZipFile(path)
    names = wheel.namelist()
    meta = {n.split("/", 1)[1]: wheel.read(n).decode() for n in names if ".dist-info/" in n}
    return names, meta


names, meta = contents(sys.argv[1])
required = ["flexkd/__init__.py", "flexkd/ops/__init__.py", "flexkd/kernels/__init__.py", "flexkd/cli.py"]
missing = [n for n in required if n not in names]
assert not missing, f"missing from the library wheel: {missing}"
assert any(n.startswith("flexkd/_C") and n.endswith((".so", ".pyd")) for n in names), "no flexkd/_C in the wheel"
assert not any(n.startswith("kernels/") for n in names), "kernels/ must ship as flexkd.kernels only"
lab_files = [n for n in names if n.startswith(("flexkd_lab/", "flexkd/data/", "flexkd/tasks/", "flexkd/experiments/"))
             or n in ("flexkd/commands/demo.py", "flexkd/commands/study.py")]
assert not lab_files, f"the library wheel carries the lab: {lab_files[:5]}"
data = [n for n in names if n.endswith((".jsonl.gz", ".jsonl", ".parquet", ".csv"))]
assert not data, f"the library wheel carries data: {data[:5]}"
requires = [line for line in meta["METADATA"].splitlines() if line.startswith("Requires-Dist:")]
hard = [r for r in requires if "extra ==" not in r]
assert not any("matplotlib" in r for r in hard), f"matplotlib is a hard dependency: {hard}"
assert any("matplotlib" in r and 'extra == "plot"' in r for r in requires), "no flexkd[plot] extra"
assert "flexkd.commands" not in meta.get("entry_points.txt", ""), "the library registers lab commands"
print(f"library wheel: {len(names)} files, flexkd/_C and flexkd/kernels among them, no data, no lab code;")
print("  hard dependencies: " + ", ".join(r.split(":", 1)[1].strip() for r in hard))

names, meta = contents(sys.argv[2])
snapshot = [n for n in names if n.startswith("flexkd_lab/data/debian/")]
assert sum(n.endswith(".jsonl.gz") for n in snapshot) == 6, f"the lab wheel misses the snapshot: {snapshot}"
assert "flexkd_lab/data/debian/meta.json" in names and "flexkd_lab/commands/demo.py" in names
entry_points = meta["entry_points.txt"]
for line in ("[flexkd.commands]", "demo = flexkd_lab.commands.demo", "study = flexkd_lab.commands.study"):
    assert line in entry_points, f"{line!r} not in the lab's entry_points.txt:\n{entry_points}"
assert not any(n.startswith("flexkd/") for n in names), "the lab wheel carries library files"
print(f"lab wheel: {len(names)} files, {len(snapshot)} of them the bundled snapshot; entry points demo, study")
EOF

step "installing the library wheel alone into a fresh virtual environment"
# The venv sees this Python's packages (torch, transformers, ...) through a view of its site-packages
# that leaves out this project's own installs. --system-site-packages would not: the README's set-up
# installs flexkd and flexkd_lab editable there, and their finder hooks and dist-info (entry points
# included) would leak into the venv.
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$PY" - "$WORK/site-view" <<'EOF'
import os
import re
import site
import sys

view = sys.argv[1]
os.makedirs(view)
site_dirs = ([site.getusersitepackages()] if site.ENABLE_USER_SITE else []) + site.getsitepackages()
own = re.compile(r"^(flexkd|flexkd_lab)([-.].*)?$|^__editable__|\.pth$|^__pycache__$")
for site_dir in filter(os.path.isdir, site_dirs):
    for name in os.listdir(site_dir):
        if not own.search(name) and not os.path.lexists(os.path.join(view, name)):
            os.symlink(os.path.join(site_dir, name), os.path.join(view, name))
EOF
echo "$WORK/site-view" >"$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/site-view.pth"
"$VPY" -m pip install --quiet --no-deps --no-index "$WHEEL"
cd "$WORK"
if "$VPY" -c "import flexkd_lab" 2>/dev/null; then
  echo "wheel_smoke: flexkd_lab is importable before the lab wheel is installed" >&2; exit 1
fi
"$VPY" -c "import torch, transformers" || { echo "wheel_smoke: the venv does not see torch or transformers" >&2; exit 1; }

step "smoke test of the library from outside the source tree"
export FLEXKD_SOURCE="$ROOT" TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
"$WORK/venv/bin/flexkd" info >"$WORK/info.txt" || { cat "$WORK/info.txt"; exit 1; }
head -n 3 "$WORK/info.txt"
"$VPY" -W ignore - <<'EOF'
import os
import sys
from pathlib import Path

import torch

import flexkd
import flexkd._C
import flexkd.kernels
from flexkd.cli import main
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
assert "matplotlib" not in sys.modules, "the ops imported matplotlib"

for lab_command in ("demo", "study"):  # without the lab the library has no such subcommand
    try:
        main([lab_command, "--help"])
    except SystemExit as exit:
        assert exit.code == 2, f"flexkd {lab_command} --help exited {exit.code} without the lab"
    else:
        raise AssertionError(f"flexkd {lab_command} ran without the lab installed")
print("library alone: no demo or study subcommand")
EOF

step "installing the lab wheel next to it"
"$VPY" -m pip install --quiet --no-deps --no-index "$LAB_WHEEL"
"$WORK/venv/bin/flexkd" --help | tee "$WORK/help.txt" | grep -E "^    (demo|study) "
grep -qE "^    demo " "$WORK/help.txt" && grep -qE "^    study " "$WORK/help.txt"
"$WORK/venv/bin/flexkd" demo --help >/dev/null
"$WORK/venv/bin/flexkd" study --help >/dev/null
"$VPY" -W ignore - <<'EOF'
import os
from pathlib import Path

import flexkd_lab
from flexkd_lab.data import SNAPSHOT_DIR, load_task

source = Path(os.environ["FLEXKD_SOURCE"]).resolve()
where = Path(flexkd_lab.__file__).resolve()
assert source not in where.parents, f"flexkd_lab was imported from the source tree: {where}"
rows = load_task("debian-sections", "validation", limit=5)
assert len(rows) == 5, rows
print(f"flexkd_lab: {where}; bundled snapshot at {SNAPSHOT_DIR}: {sorted(os.listdir(SNAPSHOT_DIR))[:3]}...")
EOF
step "OK: both wheels install; the library runs alone, the lab adds demo and study and ships the data"
