"""``flexkd info`` / ``python -m flexkd.info``: versions, what was compiled, which backend each op uses."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform

from flexkd import __version__

OPS = ("flex_feature_loss", "importance_scores", "linear_logit_kd")


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _resolution(op: str, device_type: str) -> str:
    from flexkd.ops import _backends

    try:
        return _backends.resolve("auto", device_type, op)
    except (RuntimeError, ValueError) as err:
        return f"error: {err}"


def collect() -> dict:
    """Everything ``flexkd info`` prints, as a dict."""
    import warnings

    import torch  # here, not at module level: ``flexkd info --help`` must not wait for torch

    from flexkd import _native
    from flexkd.ops import _backends

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolution = {
            op: {device: _resolution(op, device) for device in ("cpu", "cuda")} for op in OPS
        }
        backends = {
            backend: {
                device: _backends.unavailable_reason(backend, device) or "available"
                for device in ("cpu", "cuda")
            }
            for backend in ("torch", "cpu", "cuda", "triton")
        }
    return {
        "flexkd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _package_version("triton"),
        "native_extension": {
            "loaded": _native.load() is not None,
            "error": _native.load_error(),
            "build": _native.build_info(),
        },
        "backends": backends,
        "auto_resolves_to": resolution,
    }


def render(info: dict) -> str:
    native = info["native_extension"]
    lines = [
        f"flexkd {info['flexkd']}  (python {info['python']})",
        f"torch {info['torch']}  cuda build: {info['torch_cuda'] or 'none'}  "
        f"cuda available: {info['cuda_available']}",
        f"triton: {info['triton'] or 'not installed'}",
        f"flexkd._C: {'loaded' if native['loaded'] else 'NOT loaded: ' + str(native['error'])}",
    ]
    for key, value in sorted(native["build"].items()):
        lines.append(f"  {key}: {value}")
    built_torch = native["build"].get("torch_version")
    if built_torch and built_torch.split("+")[0] != info["torch"].split("+")[0]:
        lines.append(
            f"  WARNING: built against torch {built_torch}, running torch {info['torch']}: rebuild flexkd"
        )
    lines.append("backends (cpu tensors | cuda tensors):")
    for backend, per_device in info["backends"].items():
        lines.append(f"  {backend:7s} {per_device['cpu']} | {per_device['cuda']}")
    lines.append("backend=auto resolves to (cpu tensors | cuda tensors):")
    for op, per_device in info["auto_resolves_to"].items():
        lines.append(f"  {op:18s} {per_device['cpu']} | {per_device['cuda']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexkd.info", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
