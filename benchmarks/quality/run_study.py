"""The Flex-KD quality study; the same as ``flexkd study`` (see README.md next to this file).

python benchmarks/quality/run_study.py                 # everything, resumable
python benchmarks/quality/run_study.py --seeds 0 --no-ablation
"""

from __future__ import annotations

import argparse
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    from flexkd_lab.commands import study

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="run_study.py", description=study.__doc__.splitlines()[0])
    study.add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "benchmarks/quality/run_study.py", *argv])
    return study.run(args)


if __name__ == "__main__":
    sys.exit(main())
