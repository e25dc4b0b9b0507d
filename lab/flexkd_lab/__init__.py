"""flexkd-lab: the research side of flexkd, apart from the library.

The bundled Debian snapshot (``flexkd_lab.data``), the tasks built on it (``flexkd_lab.tasks``), the
experiment pipeline, demo and quality study (``flexkd_lab.experiments``), and the ``flexkd demo`` /
``flexkd study`` subcommands (``flexkd_lab.commands``), which the ``flexkd`` command finds through the
``flexkd.commands`` entry-point group.
"""

__version__ = "0.1.0"
