"""Data shipped with the package: configs/ is installed as medusa_cli.configs."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any


def config_file(*parts: str):
    """A Traversable for configs/<parts>, in an installed wheel, an editable install, and a
    checkout that is only on sys.path (as gpu_bundle runs it on a machine where nothing is
    installed), where configs/ sits beside the package."""
    try:
        node = importlib.resources.files("medusa_cli.configs")
    except ModuleNotFoundError:
        node = Path(__file__).resolve().parent.parent / "configs"
    for part in parts:
        node = node / part
    return node


def load_config_json(*parts: str) -> Any:
    return json.loads(config_file(*parts).read_text())
