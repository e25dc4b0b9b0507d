"""The corr-loss cases of issue 11 on every backend that runs here, next to an fp64 computation.

    TRITON_INTERPRET=1 python benchmarks/corr_numerics.py

Cases (N=8192, D=256, k=64, fp32, seed 0): row 0 masked with its selected teacher dims set to 3000;
teacher column means 2000 with a zeroed, masked row 0 (a padded store); and a correlated pair
(true loss about 0.005) scaled by 1, 0.1, 0.03 and 0.01 (a scale-invariant loss reads the same).
"""

from __future__ import annotations

import os

import torch

from flexkd.ops import _backends, flex_feature_loss, reference

N, D, K = 8192, 256, 64


def _inputs(generator):
    student = torch.randn(N, K, generator=generator)
    teacher = torch.randn(N, D, generator=generator)
    index = torch.randperm(D, generator=generator)[:K]
    return student, teacher, index


def cases():
    g = torch.Generator().manual_seed(0)
    student, teacher, index = _inputs(g)
    mask = torch.ones(N)
    mask[0] = 0
    outlier = teacher.clone()
    outlier[0, index] = 3000.0
    yield "row 0 masked, teacher dims 3000", student, outlier, index, mask

    shifted = teacher + 2000.0
    shifted[0] = 0.0
    yield "column means 2000, zero masked row 0", student, shifted, index, mask

    correlated = teacher.clone()
    correlated[:, index] = student + 0.1 * torch.randn(N, K, generator=g)
    for scale in (1.0, 0.1, 0.03, 0.01):
        yield f"correlated pair x{scale}", student * scale, correlated * scale, index, None


def backends() -> list[str]:
    names = ["torch"]
    for name in ("cpu", "triton"):
        if _backends.unavailable_reason(name, "cpu") is None:
            names.append(name)
    return names


def main() -> None:
    names = backends()
    print(f"eps = default; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    print(f"{'case':40s} {'fp64':>9s} " + " ".join(f"{n:>9s}" for n in names))
    for label, student, teacher, index, mask in cases():
        exact = reference.flex_feature_loss(
            student.double(), teacher.double(), index, None if mask is None else mask.double(), loss="corr"
        )
        values = [flex_feature_loss(student, teacher, index, mask, loss="corr", backend=n) for n in names]
        print(f"{label:40s} {exact.item():9.4f} " + " ".join(f"{v.item():9.4f}" for v in values))


if __name__ == "__main__":
    main()
