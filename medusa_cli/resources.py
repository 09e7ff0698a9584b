"""Data shipped with the package: configs/ is installed as medusa_cli.configs."""

from __future__ import annotations

import importlib.resources
import json
from typing import Any


def config_file(*parts: str):
    """A Traversable for configs/<parts>, in a checkout and in an installed wheel alike."""
    node = importlib.resources.files("medusa_cli.configs")
    for part in parts:
        node = node / part
    return node


def load_config_json(*parts: str) -> Any:
    return json.loads(config_file(*parts).read_text())
