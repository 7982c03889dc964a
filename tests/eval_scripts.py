"""Import a script of evals/ as a module (evals/ is a folder of scripts, not a package)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

EVALS_DIR = Path(__file__).resolve().parent.parent / "evals"


def import_eval_script(name: str):
    """``evals/<name>.py`` as a module, without leaving evals/ on sys.path."""
    sys.path.insert(0, str(EVALS_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EVALS_DIR))
