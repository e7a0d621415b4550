"""Per-site image folders for a deployment trial, cut from a configured data set:

    python -m tools.deploy.sites --config configs/deploy.yaml --out deploy-data

writes, for the config's partitions (the same split the research mode uses),
``<out>/site-<i>/{train,test}/<class>/*.png`` for the training sites,
``<out>/coldstart-<j>/{train,test}/<class>/*.png`` for the cold-start sites and
``<out>/global/test/<class>/*.png`` (the global test set, for the server's
``global_test_dir``), and prints the ``--node-config`` of every SuperNode and the
``class_names`` of the federation. PNG is lossless, so a site run on these folders sees
exactly the pixels the research mode sees. A real site needs none of this: it points
``data-dir`` at its own images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedcoe_flwr.config import ExperimentConfig, config_from_run_config
from fedcoe_flwr.data import client_splits, load_dataset, load_global_test
from fedcoe_flwr.simulate import parse_overrides


def format_node_config(values: Mapping[str, Any]) -> str:
    """A ``--node-config`` string: strings quoted, booleans as true/false, numbers bare."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v) if isinstance(v, (int, float)) else f'"{v}"'

    return " ".join(f"{k}={value(v)}" for k, v in values.items())


@dataclass
class SiteFolders:
    root: Path
    training: list[Path]  # site-<i>, i = 0..num_clients-1
    coldstart: list[Path]  # coldstart-<j>, j = 0..num_coldstart_clients-1
    global_test: Path
    class_names: list[str]

    def node_config_values(self, index: int) -> dict[str, Any]:
        """The node config of the SuperNode with client index ``index``."""
        n = len(self.training)
        if index < n:
            return {"data-dir": str(self.training[index]), "site-id": index}
        return {"data-dir": str(self.coldstart[index - n]), "site-id": index - n, "cold-start": True}

    def node_config(self, index: int) -> str:
        """The --node-config of the SuperNode with client index ``index``."""
        return format_node_config(self.node_config_values(index))


def _write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    from PIL import Image

    for i, (img, y) in enumerate(zip(images, labels)):
        out = folder / split / names[int(y)]
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img)).save(out / f"{i:05d}.png")


def export_sites(cfg: ExperimentConfig, out: str | os.PathLike, overwrite: bool = True) -> SiteFolders:
    out = Path(out).resolve()
    data = load_dataset(cfg)
    names = list(data.class_names)
    splits = client_splits(cfg)
    training = [out / f"site-{i}" for i in range(cfg.num_clients)]
    coldstart = [out / f"coldstart-{j}" for j in range(cfg.num_coldstart_clients)]
    for index, folder in enumerate(training + coldstart):
        if folder.exists() and overwrite:
            shutil.rmtree(folder)
        train_idx, test_idx = splits[index]
        _write_split(folder, "train", data.train_x[train_idx], data.train_y[train_idx], names)
        _write_split(folder, "test", data.train_x[test_idx], data.train_y[test_idx], names)
    global_dir = out / "global"
    if global_dir.exists() and overwrite:
        shutil.rmtree(global_dir)
    gx, gy = load_global_test(cfg.replace(global_test_dir=""))
    _write_split(global_dir, "test", gx.permute(0, 2, 3, 1).numpy(), gy.numpy(), names)
    (out / "sites.json").write_text(json.dumps({
        "class_names": names, "training": [str(p) for p in training], "coldstart": [str(p) for p in coldstart],
        "global_test_dir": str(global_dir)}, indent=1))
    return SiteFolders(out, training, coldstart, global_dir, names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml", help="YAML naming the data set to cut")
    parser.add_argument("--out", default="deploy-data", help="folder for the site folders (git-ignored)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    cfg = config_from_run_config({"config": args.config, **parse_overrides(args.set)}, os.getcwd())
    sites = export_sites(cfg, args.out)
    print(f"class_names='{','.join(sites.class_names)}'")
    print(f"global_test_dir='{sites.global_test}'")
    for index in range(cfg.num_partitions):
        print(f"client {index}: --node-config '{sites.node_config(index)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
