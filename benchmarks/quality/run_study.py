"""The Flex-KD quality study; the same as ``flexkd study`` (see README.md next to this file), except that
results go to this repository's ``benchmarks/results`` unless ``--out`` says otherwise.

python benchmarks/quality/run_study.py --workers 2     # minilm-tiny, 5 seeds, resumable
python benchmarks/quality/run_study.py --seeds 0 1 --methods none flex-corr flex-corr-random
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> int:
    from flexkd_lab.commands import study

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="run_study.py", description=study.__doc__.splitlines()[0])
    study.add_arguments(parser)
    parser.set_defaults(out=RESULTS)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "benchmarks/quality/run_study.py", *argv])
    return study.run(args)


if __name__ == "__main__":
    sys.exit(main())
