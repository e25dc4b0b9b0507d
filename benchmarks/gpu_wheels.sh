#!/usr/bin/env bash
# The wheels the device machine lacks, for its Python (3.12, x86-64 manylinux), into .whl/ at the repo's root
# (git-ignored; ~4 MB): pydantic and datasets, which flexkd's config and training code import, what they
# need that it does not have, and Liger-Kernel for gpu_check.sh's linear_logit_kd comparison. Run it here
# (pip reaches the package registries), then name .whl in the device call's carry; gpu_check.sh installs
# whatever is in .whl/ into /tmp/flexkd-site. The bundled pretrained MiniLM (84 MB) does not fit the
# 64 MiB a device call carries: the tests that need it skip there.
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  liger-kernel==0.8.5
du -sh .whl
