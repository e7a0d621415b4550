"""Site folders cut from the tiny generated data set, as a deployment's sites hold them."""

from __future__ import annotations

import pytest
from tools.deploy.sites import export_sites


# ------------------------------------------------------------------ site data
@pytest.fixture
def sites(make_cfg, tmp_path, fresh_caches):
    """Site folders cut from the tiny generated data set (3 training + 1 cold-start)."""
    cfg = make_cfg()
    folders = export_sites(cfg, tmp_path / "sites")
    return make_cfg(class_names=",".join(folders.class_names)), folders
