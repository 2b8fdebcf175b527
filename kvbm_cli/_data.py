"""The files kvbm ships as package data (read with importlib.resources, so a wheel install finds them too).

Operations:
  data_dir(name)   kvbm_cli/<name> as a path: "scenarios" (bench compare) or "dashboards" (metrics up)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_dir(name: str) -> Path:
    """The shipped folder `name` (wheels install unzipped, so it is a real directory)."""
    return Path(str(resources.files("kvbm_cli") / name))
