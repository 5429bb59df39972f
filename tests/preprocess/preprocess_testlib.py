"""Helpers of the preprocessing-script tests: import a script of preprocess/ as a module."""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "preprocess"


def load_script(name: str):
    """Import ``preprocess/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"preprocess_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # so that its functions pickle into worker processes
    spec.loader.exec_module(mod)
    return mod
