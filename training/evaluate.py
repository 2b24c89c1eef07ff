"""Moved to :mod:`mien.export.evaluate` (measuring exported models belongs to export, issue 13).

A temporary re-export for the importers not yet switched (mien/cli.py, tests/test_bundled_model.py,
tests/test_ferplus.py). It points training at export, the wrong way: delete it once they import
mien.export.evaluate.
"""

from mien.export.evaluate import classification_report, eval_split, evaluate_path, plot_confusion

__all__ = ["classification_report", "eval_split", "evaluate_path", "plot_confusion"]
