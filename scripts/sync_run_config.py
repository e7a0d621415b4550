"""Rewrite [tool.flwr.app.config] in pyproject.toml from the ExperimentConfig fields
(Flower only accepts --run-config keys declared there). Run after adding a config key:
    python scripts/sync_run_config.py"""

import re
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fedcoe_flwr.config import UNSET, ExperimentConfig  # noqa: E402

defaults = ExperimentConfig()
lines = ['config = "configs/default.yaml"'] + [
    f'{f.name} = "{UNSET}"  # built-in default: {getattr(defaults, f.name)!r}'
    for f in fields(ExperimentConfig) if f.name != "config_path"
]
path = ROOT / "pyproject.toml"
text = path.read_text()
section = re.compile(r"(\[tool\.flwr\.app\.config\]\n)(.*?)(\n\n\[)", re.S)
text, n = section.subn(lambda m: m.group(1) + "\n".join(lines) + m.group(3), text)
assert n == 1, "no [tool.flwr.app.config] section followed by another table"
path.write_text(text)
print(f"wrote {len(lines)} run-config keys to {path}")
