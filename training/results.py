"""Moved to :mod:`mien.export.results` (``mien results`` measures exported models, issue 13).

A temporary re-export for mien/cli.py, the importer not yet switched. It points training at export, the
wrong way: delete it once mien/cli.py imports mien.export.results (or calls mien.export.cli).
"""

from mien.export.results import ResultsConfig, write_results

__all__ = ["ResultsConfig", "write_results"]
