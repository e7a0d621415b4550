"""Real data: a few hundred CIFAR-10 JPEGs taken from the shared archive, read through
the image-folder path (folder and .tar.gz), partitioned, and trained on for one FedCoE
client step. Decoding all 60,000 images would take 10-20 s, so only a subset is used."""

from __future__ import annotations

import math
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.algorithms.fedcoe import CORRELATION, FedCoE
from fedcoe_flwr.data import client_splits, load_client_data, load_dataset, read_image_folder
from fedcoe_flwr.server.validation import validate_reply

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = {"train": 30, "test": 10}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ARCHIVE.is_file(),
                       reason=f"real-data test needs the shared CIFAR-10 copy at {ARCHIVE} (not present here)"),
]


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """train/<class>/* and test/<class>/*: the first PER_CLASS[split] JPEGs of each class."""
    root = tmp_path_factory.mktemp("cifar10-subset")
    taken: dict[tuple[str, str], int] = defaultdict(int)
    want = len(CIFAR10) * sum(PER_CLASS.values())
    with tarfile.open(ARCHIVE) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in PER_CLASS:
                continue
            split, cls = parts[-3], parts[-2]
            if taken[split, cls] >= PER_CLASS[split]:
                continue
            target = root / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            taken[split, cls] += 1
            if sum(taken.values()) == want:
                break
    assert sum(taken.values()) == want, f"archive holds fewer images than expected: {dict(taken)}"
    return root


def test_class_names_and_labels(subset):
    d = read_image_folder(subset, size=32)
    assert d.class_names == CIFAR10  # alphabetical == CIFAR-10's own label order
    assert d.train_x.shape == (300, 32, 32, 3) and d.train_x.dtype == np.uint8
    assert d.test_x.shape == (100, 32, 32, 3)
    assert np.bincount(d.train_y, minlength=10).tolist() == [30] * 10
    assert np.bincount(d.test_y, minlength=10).tolist() == [10] * 10
    # folders are read in sorted order: the first training image is the first airplane,
    # the last one the last truck, and each carries its folder's label
    first = sorted((subset / "train" / "airplane").iterdir())[0]
    last = sorted((subset / "train" / "truck").iterdir())[-1]
    np.testing.assert_array_equal(d.train_x[0], np.asarray(Image.open(first).convert("RGB")))
    np.testing.assert_array_equal(d.train_x[-1], np.asarray(Image.open(last).convert("RGB")))
    assert d.train_y[0] == 0 and d.train_y[-1] == 9
    # real photos, not blank decodes
    assert d.train_x.std() > 30


def test_archive_and_folder_agree(subset, tmp_path):
    archive = tmp_path / "subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(subset, arcname="cifar10")
    a, b = read_image_folder(subset, size=16), read_image_folder(archive, size=16)
    assert a.class_names == b.class_names == CIFAR10
    np.testing.assert_array_equal(a.train_y, b.train_y)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_x, b.test_x)
    assert a.train_x.shape[1:] == (16, 16, 3)


def test_partition_and_one_fedcoe_client_step(subset, make_cfg, cpu, fresh_caches):
    cfg = make_cfg(dataset="imagefolder", data_root=str(subset), image_size=32, num_clients=4,
                   num_coldstart_clients=1, partition="dirichlet", dirichlet_alpha=0.5,
                   min_partition_size=20, num_experts=2, top_m=0, batch_size=32)
    data = load_dataset(cfg)
    assert data.class_names == CIFAR10 and data.num_classes == 10
    splits = client_splits(cfg)
    everything = np.concatenate([np.concatenate(s) for s in splits])
    assert len(everything) == len(np.unique(everything)) == 300
    for tr, te in splits:
        assert len(np.intersect1d(tr, te)) == 0 and len(tr) > len(te) > 0

    client = load_client_data(cfg, 0)
    tr, _ = splits[0]
    np.testing.assert_array_equal(client.train_y.numpy(), data.train_y[tr])
    assert tuple(client.train_x.shape[1:]) == (3, 32, 32)

    algo = FedCoE()
    state = algo.init_state(cfg, data.num_classes)
    payload, config = algo.train_payload(state, cfg, 0, 1)
    upload, private, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=client, cfg=cfg, num_classes=data.num_classes, device=cpu, seed=0))
    assert metrics["num_samples"] == len(tr) and math.isfinite(metrics["train_loss"])
    assert metrics["train_loss"] < 10 * math.log(10)  # sane cross-entropy scale, not a blow-up
    assert upload[CORRELATION].sum().item() == pytest.approx(1.0, abs=1e-5)
    expected = algo.expected_upload(payload, config, cfg)
    assert validate_reply(upload, metrics, expected, payload, cfg.max_update_norm_ratio) is None
    assert private and all(k.startswith(("local.", "local_gate.", "local_prior")) for k in private)
    assert not any(k.startswith("local") for k in upload)  # private parts never uploaded

    cold = load_client_data(cfg, cfg.num_clients)
    payload, config = algo.coldstart_payload(state, cfg)
    out = algo.client_coldstart(ClientStep(payload, config, None, cold, cfg, data.num_classes, cpu))
    assert 0.0 <= out["coldstart_accuracy"] <= 1.0 and out["num_test"] == len(cold.test_y)
    assert torch.isfinite(torch.tensor(out["routing_row"])).all()
