"""Rewrite [tool.flwr.app.config] in pyproject.toml from the config sections (Flower only
accepts --run-config keys declared there). Run after adding a config key:
    python scripts/sync_run_config.py"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fedcoe_flwr.config import UNSET, ExperimentConfig, key_sections  # noqa: E402

defaults = ExperimentConfig().to_dict()
lines = ['config = "configs/default.yaml"']
section = None
for key, holders in key_sections().items():
    if holders[0] != section:
        section = holders[0]
        lines.append(f"# {'model' if section == 'network' else section}")
    lines.append(f'{key} = "{UNSET}"  # built-in default: {defaults[key]!r}')
path = ROOT / "pyproject.toml"
text = path.read_text()
block = re.compile(r"(\[tool\.flwr\.app\.config\]\n)(.*?)(\n\n\[)", re.S)
text, n = block.subn(lambda m: m.group(1) + "\n".join(lines) + m.group(3), text)
assert n == 1, "no [tool.flwr.app.config] section followed by another table"
path.write_text(text)
print(f"wrote {len(key_sections())} run-config keys to {path}")
