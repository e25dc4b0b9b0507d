"""Subcommands the lab adds to ``flexkd`` (entry-point group ``flexkd.commands``); each module exposes
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int`` and imports nothing heavy at module level."""
