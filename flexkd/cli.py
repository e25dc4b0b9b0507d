"""The ``flexkd`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``, imported only when it is used.

Other distributions add subcommands through the ``flexkd.commands`` entry-point group (flexkd-lab adds
``demo`` and ``study``): each entry names a module that also exposes ``HELP``, the one-line description,
and imports nothing heavy at module level, since listing the subcommands imports it."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import shlex
import sys
from typing import NoReturn

from flexkd.errors import FlexKDError

SUBCOMMANDS = {
    "info": ("flexkd.info", "versions, compiled kernels and the backend each op resolves to"),
    "score": ("flexkd.commands.score", "score teacher dimensions and write a selection file"),
    "distill": ("flexkd.commands.distill", "distil a student from a YAML config"),
    "eval": ("flexkd.commands.eval", "evaluate a student from a YAML config"),
    "bench": ("flexkd.commands.bench", "kernel microbenchmarks"),
}
ENTRY_POINT_GROUP = "flexkd.commands"


def plugin_subcommands() -> dict[str, tuple[str, str]]:
    """``{name: (module, help)}`` of the subcommands installed distributions add through
    ``ENTRY_POINT_GROUP``; a name the library already uses stays the library's. A plugin whose module
    does not import (a distribution installed from a folder that has since moved, say) is left out with a
    warning on stderr: it must not take the library's own subcommands down with it."""
    found: dict[str, tuple[str, str]] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in SUBCOMMANDS or entry.name in found:
            continue
        try:
            help_text = importlib.import_module(entry.module).HELP
        except ImportError as err:
            print(f"flexkd: warning: subcommand {entry.name!r} from {entry.module} is not available "
                  f"({type(err).__name__}: {err})", file=sys.stderr)  # fmt: skip
            continue
        found[entry.name] = (entry.module, help_text)
    return found


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """A parser listing every subcommand that imports only the module of the one being run."""
    parser = argparse.ArgumentParser(prog="flexkd", description="Flex-KD feature distillation")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, help_text) in {**SUBCOMMANDS, **plugin_subcommands()}.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    args.command_line = shlex.join(["flexkd", *argv])  # how it was invoked, for records that say so
    try:
        code = int(args._run(args) or 0)
    except FlexKDError as error:  # the user's to fix: one line, no traceback; anything else is a bug
        print(f"flexkd {args.command}: error: {error}", file=sys.stderr)
        return 2
    # After a command that ran distributed, not after a failure (its barrier would wait on ranks that
    # may never reach it).
    if "torch.distributed" in sys.modules:
        from flexkd.distributed import close_process_group

        close_process_group()
    return code


def console_main() -> NoReturn:
    """``flexkd`` and ``python -m flexkd``: :func:`main`, then the process ends (a rank of a torchrun or
    accelerate launch through :func:`flexkd.distributed.end_launched_rank`)."""
    code = main()
    if "torch.distributed" in sys.modules:
        from flexkd.distributed import end_launched_rank

        end_launched_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
