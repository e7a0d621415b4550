"""Data layer: generated data, image folders and archives, partitions (determinism,
disjointness, coverage, stratified local splits), client tensors and batches."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from harness import COLOURS, make_image_folder

from fedcoe_flwr import data as data_mod
from fedcoe_flwr.data import dataset as data_dataset
from fedcoe_flwr.data import sources as data_sources
from fedcoe_flwr.data import (DataError, batches, client_splits, is_coldstart, load_client_data,
                              load_dataset, load_global_test, load_site_data, load_site_images, normalize,
                              read_image_folder, stratified_split)



def colour_label(images: np.ndarray, names: list[str]) -> np.ndarray:
    """Recover each image's class from its mean colour."""
    means = images.reshape(len(images), -1, 3).mean(1)
    ref = np.array([COLOURS[n] for n in names], dtype=float)
    return np.argmin(((means[:, None, :] - ref[None]) ** 2).sum(-1), axis=1)


# ------------------------------------------------------------------ generated data
def test_synthetic_data_shapes_balance_and_determinism(make_cfg, fresh_caches):
    cfg = make_cfg(synthetic_train_size=200, synthetic_test_size=40, synthetic_num_classes=4, image_size=12)
    d = load_dataset(cfg)
    assert d.train_x.shape == (200, 12, 12, 3) and d.train_x.dtype == np.uint8
    assert d.test_x.shape == (40, 12, 12, 3)
    assert d.num_classes == 4 and d.class_names == ["class0", "class1", "class2", "class3"]
    assert np.bincount(d.train_y).tolist() == [50] * 4
    assert np.bincount(d.test_y).tolist() == [10] * 4
    fresh_caches()
    again = load_dataset(cfg)
    assert again is not d
    np.testing.assert_array_equal(again.train_x, d.train_x)
    np.testing.assert_array_equal(again.train_y, d.train_y)
    other = load_dataset(cfg.replace(seed=1))
    assert not np.array_equal(other.train_x, d.train_x)


def test_synthetic_classes_are_learnable_from_the_mean_image(make_cfg):
    """Class prototypes differ: a nearest-class-mean rule beats chance by far."""
    d = load_dataset(make_cfg(synthetic_train_size=400, synthetic_test_size=200))
    x, y = d.train_x.reshape(len(d.train_x), -1).astype(float), d.train_y
    means = np.stack([x[y == c].mean(0) for c in range(d.num_classes)])
    tx = d.test_x.reshape(len(d.test_x), -1).astype(float)
    pred = np.argmin(((tx[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == d.test_y).mean() > 0.9


# ------------------------------------------------------------------ image folders
@pytest.mark.parametrize("archive", [False, True])
def test_read_image_folder_and_archive(tmp_path, archive):
    root = make_image_folder(tmp_path / "imgs")
    source = root
    if archive:
        source = tmp_path / "imgs.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(root, arcname="cifar-like")  # a leading folder, as real archives have
    (root / "train" / "README.txt").write_text("not an image")  # ignored
    d = read_image_folder(source, size=8)
    assert d.class_names == ["ant", "bee", "cat"]
    assert d.train_x.shape == (12, 8, 8, 3) and d.train_x.dtype == np.uint8
    assert d.test_x.shape == (5, 8, 8, 3)
    assert np.bincount(d.train_y, minlength=3).tolist() == [4, 3, 5]
    assert np.bincount(d.test_y, minlength=3).tolist() == [2, 2, 1]
    np.testing.assert_array_equal(colour_label(d.train_x, d.class_names), d.train_y)
    np.testing.assert_array_equal(colour_label(d.test_x, d.class_names), d.test_y)


@pytest.mark.parametrize("name, expected", [
    ("cifar10/train/cat/1.jpg", ("train", "cat")), ("./train/cat/1.JPG", ("train", "cat")),
    ("/abs/test/dog//2.png", ("test", "dog")), ("train/1.jpg", None), ("x/val/cat/1.jpg", None),
    ("train/cat/notes.txt", None), ("train/cat/sub/1.png", None)])
def test_which_paths_are_labelled_images(name, expected):
    assert data_sources._split_member(name) == expected


def test_read_image_folder_with_given_class_names(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"train": {"bee": 2, "cat": 2}, "test": {"cat": 1}})
    names = ["cat", "dog", "bee", "ant"]  # the federation's order, a superset of what is here
    d = read_image_folder(root, size=8, class_names=names)
    assert d.class_names == names and d.num_classes == 4
    assert sorted(d.train_y.tolist()) == [0, 0, 2, 2]
    np.testing.assert_array_equal(colour_label(d.train_x, ["cat", "bee"]), (d.train_y == 2).astype(int))
    assert d.test_y.tolist() == [0]


def test_unknown_class_folder_is_named(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match="cat"):
        read_image_folder(root, size=8, class_names=["ant", "bee"])


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        read_image_folder(tmp_path / "empty")


def test_folder_without_test_split_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"train": {"ant": 2}})
    with pytest.raises(DataError, match="test/"):
        read_image_folder(root, size=8)


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_image_folder(tmp_path / "nowhere")


def test_corrupt_image_is_named(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    (root / "train" / "ant" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        read_image_folder(root, size=8)


def test_corrupt_archive_is_an_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 truncated gzip")
    with pytest.raises(DataError, match="bad.tar.gz"):
        read_image_folder(bad)


def test_imagefolder_dataset_is_decoded_once_and_cached(make_cfg, tmp_path, fresh_caches, monkeypatch):
    root = make_image_folder(tmp_path / "imgs")
    cfg = make_cfg(dataset="imagefolder", data_root=str(root), image_size=8)
    first = load_dataset(cfg)
    cached = list((tmp_path / "cache").glob("imagefolder-*"))
    assert len(cached) == 1
    assert sorted(p.name for p in cached[0].iterdir()) == [
        "class_names.json", "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    fresh_caches()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache exists")

    monkeypatch.setattr(data_dataset, "read_image_folder", no_decoding)
    (root / "train" / "README.txt").write_text("not an image: not decoded, not in the key")
    second = load_dataset(cfg)
    assert isinstance(second.train_x, np.memmap)  # shared page cache, not a private copy
    assert second.class_names == first.class_names
    np.testing.assert_array_equal(second.train_x, first.train_x)
    np.testing.assert_array_equal(second.test_y, first.test_y)


def test_site_labels_follow_the_federation_class_names(make_cfg, tmp_path, fresh_caches):
    """A site holding only some classes must label them in the federation's label space
    (config ``class_names``), not by its own folders' order."""
    root = make_image_folder(tmp_path / "site", {"train": {"bee": 3, "cat": 2}, "test": {"cat": 1, "bee": 1}})
    cfg = make_cfg(dataset="imagefolder", data_root=str(root), image_size=8, class_names="ant,bee,cat")
    d = load_dataset(cfg)
    assert d.class_names == ["ant", "bee", "cat"] and d.num_classes == 3
    assert sorted(d.train_y.tolist()) == [1, 1, 1, 2, 2]
    np.testing.assert_array_equal(colour_label(d.train_x, ["ant", "bee", "cat"]), d.train_y)
    assert data_mod.federation_classes(cfg) == d.class_names
    # the same folder without class_names: its own classes (a separate cache entry)
    own = load_dataset(cfg.replace(class_names=""))
    assert own.class_names == ["bee", "cat"] and sorted(own.train_y.tolist()) == [0, 0, 0, 1, 1]
    fresh_caches()  # and again from the .npz caches on disk: each keeps its own label space
    assert load_dataset(cfg).class_names == ["ant", "bee", "cat"]
    assert load_dataset(cfg.replace(class_names="")).class_names == ["bee", "cat"]
    with pytest.raises(DataError, match="cat"):
        load_dataset(cfg.replace(class_names="ant,bee"))


# ------------------------------------------------------------------ the decoded-image cache
def touch_later(path):
    """Move a file's mtime one second on. A rewrite of the same size within one timestamp
    tick (a few ms) cannot be told from the original by size and times; edits by people
    and tools are further apart than that."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def as_archive(root, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-like")
    return archive


def load_cached(reader, source, make_cfg, tmp_path):
    """The two readers with a disk cache: a data set's data_root and a site's data-dir."""
    if reader == "data_root":
        return load_dataset(make_cfg(dataset="imagefolder", data_root=str(source), image_size=8))
    return load_site_images(source, make_cfg(class_names="ant,bee,cat", image_size=8), cache_dir=tmp_path / "cache")


def cache_folders(tmp_path):
    return sorted(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))


def change_image(root):  # an ant image repainted in the bee colour, same name and size
    Image.new("RGB", (10, 10), COLOURS["bee"]).save(root / "train" / "ant" / "000.png")
    touch_later(root / "train" / "ant" / "000.png")


def add_image(root):
    Image.new("RGB", (10, 10), COLOURS["cat"]).save(root / "train" / "cat" / "099.png")


def remove_image(root):
    (root / "train" / "bee" / "000.png").unlink()


def corrupt_image(root):
    (root / "train" / "cat" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


@pytest.mark.parametrize("edit", [change_image, add_image, remove_image, corrupt_image])
@pytest.mark.parametrize("archive", [False, True])
@pytest.mark.parametrize("reader", ["data_root", "site"])
def test_an_edited_image_invalidates_the_cache(make_cfg, tmp_path, fresh_caches, reader, archive, edit):
    root = make_image_folder(tmp_path / "imgs")
    source = as_archive(root, tmp_path / "imgs.tar.gz") if archive else root
    before = load_cached(reader, source, make_cfg, tmp_path)
    assert np.bincount(colour_label(before.train_x, before.class_names), minlength=3).tolist() == [4, 3, 5]
    assert len(cache_folders(tmp_path)) == 1
    fresh_caches()
    edit(root)
    if archive:
        as_archive(root, source)
        touch_later(source)
    if edit is corrupt_image:
        with pytest.raises(DataError, match="002.png"):
            load_cached(reader, source, make_cfg, tmp_path)
        return
    after = load_cached(reader, source, make_cfg, tmp_path)
    expected = {change_image: [3, 4, 5], add_image: [4, 3, 6], remove_image: [4, 2, 5]}[edit]
    assert np.bincount(colour_label(after.train_x, after.class_names), minlength=3).tolist() == expected
    assert len(cache_folders(tmp_path)) == 2  # a new version of the source, a new cache
    fresh_caches()
    again = load_cached(reader, source, make_cfg, tmp_path)  # now from the new cache
    np.testing.assert_array_equal(again.train_x, after.train_x)
    assert len(cache_folders(tmp_path)) == 2


def test_a_source_edited_while_it_is_decoded_is_not_cached(make_cfg, tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "imgs")
    decode = data_dataset.read_image_folder

    def decode_then_edit(*args, **kwargs):
        out = decode(*args, **kwargs)
        touch_later(root / "test" / "cat" / "000.png")
        return out

    monkeypatch.setattr(data_dataset, "read_image_folder", decode_then_edit)
    assert len(load_dataset(make_cfg(dataset="imagefolder", data_root=str(root), image_size=8)).test_y) == 5
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # no temp folder left


def test_a_corrupt_cache_is_decoded_again(make_cfg, tmp_path, fresh_caches, caplog):
    root = make_image_folder(tmp_path / "imgs")
    cfg = make_cfg(dataset="imagefolder", data_root=str(root), image_size=8)
    first = load_dataset(cfg)
    (folder,) = cache_folders(tmp_path)
    with open(folder / "train_x.npy", "r+b") as fh:
        fh.truncate(200)
    fresh_caches()
    second = load_dataset(cfg)
    assert "unreadable" in caplog.text
    np.testing.assert_array_equal(second.train_x, first.train_x)
    assert np.load(folder / "train_x.npy", mmap_mode="r").shape == first.train_x.shape  # rewritten whole


def test_site_cache_without_a_train_split(make_cfg, tmp_path, recwarn):
    root = make_image_folder(tmp_path / "new-site", {"test": {"bee": 2}})
    cfg = make_cfg(class_names="ant,bee,cat", image_size=8)
    first = load_site_data(root, cfg, need_train=False, cache_dir=tmp_path / "cache")
    second = load_site_data(root, cfg, need_train=False, cache_dir=tmp_path / "cache")  # from the cache
    assert tuple(second.train_x.shape) == (0, 3, 8, 8) and second.test_y.tolist() == [1, 1]
    assert torch.equal(first.test_x, second.test_x)
    assert not [w for w in recwarn if "not writable" in str(w.message)]  # tensors own their memory


def test_torchvision_root_cache_follows_its_data_set_folder(make_cfg, tmp_path, fresh_caches, monkeypatch):
    batches_dir = tmp_path / "tv" / "cifar-10-batches-py"
    batches_dir.mkdir(parents=True)
    (batches_dir / "data_batch_1").write_bytes(b"\x01")
    calls = []

    def fake_torchvision(cfg, root):  # stands in for torchvision, which checks the real files' md5
        calls.append(root)
        x = np.full((2, 8, 8, 3), (batches_dir / "data_batch_1").read_bytes()[-1], dtype=np.uint8)
        return data_mod.ImageData(x, np.array([0, 1]), x, np.array([0, 1]), ["a", "b"])

    monkeypatch.setattr(data_dataset, "torchvision_data", fake_torchvision)
    cfg = make_cfg(dataset="cifar10", data_root=str(tmp_path / "tv"), image_size=8)
    load_dataset(cfg)
    fresh_caches()
    (tmp_path / "tv" / "notes.txt").write_text("beside the data set: not part of it")
    assert load_dataset(cfg).train_x[0, 0, 0, 0] == 1 and len(calls) == 1
    fresh_caches()
    (batches_dir / "data_batch_1").write_bytes(b"\x01\x07")
    assert load_dataset(cfg).train_x[0, 0, 0, 0] == 7 and len(calls) == 2


# ------------------------------------------------------------------ missing data
@pytest.fixture
def torchvision_calls(monkeypatch):
    """Every CIFAR data set torchvision is asked for (root, train, download); each fails
    as an offline machine's would, so no test reaches the network."""
    import torchvision

    calls = []

    class Offline:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    return calls


@pytest.mark.parametrize("name", ["cifar10-jpg.tar.gz", "cifar10.tgz", "cifar10.tar", "cifar10-folder"])
def test_a_missing_data_root_is_named_and_never_downloaded_to(make_cfg, tmp_path, torchvision_calls, name):
    missing = tmp_path / "nope" / name
    with pytest.raises(DataError) as err:
        load_dataset(make_cfg(dataset="cifar10", data_root=str(missing), download=True))
    assert str(err.value).startswith(f"data_root '{missing}' does not exist")
    assert "urlopen" not in str(err.value)
    assert torchvision_calls == [] and not (tmp_path / "nope").exists()


def test_download_only_into_dot_data_or_an_existing_folder(make_cfg, tmp_path, monkeypatch, torchvision_calls):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tv").mkdir()
    for data_root, where in (("", "data"), (str(tmp_path / "tv"), str(tmp_path / "tv"))):
        with pytest.raises(DataError) as err:
            load_dataset(make_cfg(dataset="cifar10", data_root=data_root, download=True))
        assert torchvision_calls[-1] == (where, True, True)
        assert str(err.value).startswith(f"cifar10 not found or unreadable under '{where}'")


def test_a_data_root_file_that_is_no_archive_is_named(make_cfg, tmp_path, torchvision_calls):
    (tmp_path / "cifar.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="cifar.zip' is a file but not"):
        load_dataset(make_cfg(dataset="cifar10", data_root=str(tmp_path / "cifar.zip")))
    assert torchvision_calls == []


def error_text(load, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        load(*args, **kwargs)
    return str(err.value)


def test_missing_data_hints_name_only_the_remedies_of_the_mode(make_cfg, tmp_path):
    cfg = make_cfg(dataset="imagefolder", data_root=str(tmp_path / "gone"))
    node_config = ("--node-config", "data-dir", "global-test-dir")
    sim = error_text(load_dataset, cfg)
    assert "data_root=" in sim and "global_test_dir" not in sim and not any(k in sim for k in node_config)
    dep = error_text(load_dataset, cfg, mode="deployment")
    assert "data-dir" in dep and "data_root" not in dep.split(". ", 1)[1] and "--run-config" not in dep
    # the global test set: in simulation the data set's own split, in a deployment a test folder
    sim = error_text(load_global_test, cfg)
    assert "data_root=" in sim and not any(k in sim for k in node_config)
    dep = error_text(load_global_test, cfg, mode="deployment")
    assert "global-test-dir" in dep and "global_test_dir" in dep and "--run-config" not in dep
    named = cfg.replace(class_names="ant,bee", global_test_dir=str(tmp_path / "gt"))
    sim = error_text(load_global_test, named)
    assert sim.startswith(f"global test set '{tmp_path / 'gt'}' (run config global_test_dir) does not exist")
    assert not any(k in sim for k in node_config)
    dep = error_text(load_global_test, named, str(tmp_path / "node-gt"), mode="deployment")
    assert dep.startswith(f"global test set '{tmp_path / 'node-gt'}' (node config global-test-dir) does not exist")
    assert "data_root" not in dep
    with pytest.raises(ValueError, match="mode"):
        load_dataset(cfg, mode="research")


# ------------------------------------------------------------------ partitions
def _all_indices(splits):
    return np.concatenate([np.concatenate([tr, te]) for tr, te in splits])


@pytest.mark.parametrize("partition", ["dirichlet", "iid", "pathological"])
def test_client_splits_are_deterministic(make_cfg, fresh_caches, partition):
    cfg = make_cfg(partition=partition, dirichlet_alpha=0.5, num_clients=4, num_coldstart_clients=1)
    first = [(tr.copy(), te.copy()) for tr, te in client_splits(cfg)]
    fresh_caches()  # recompute from scratch, not from the memo
    second = client_splits(cfg)
    assert len(first) == len(second) == cfg.num_partitions
    for (a_tr, a_te), (b_tr, b_te) in zip(first, second):
        np.testing.assert_array_equal(a_tr, b_tr)
        np.testing.assert_array_equal(a_te, b_te)


@pytest.mark.parametrize("partition", ["dirichlet", "pathological"])
def test_a_different_seed_gives_a_different_partition(make_cfg, fresh_caches, partition):
    cfg = make_cfg(partition=partition, dirichlet_alpha=0.5, num_clients=4, num_coldstart_clients=1)
    a = client_splits(cfg)
    b = client_splits(cfg.replace(seed=1))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, b))


@pytest.mark.parametrize("partition", ["dirichlet", "iid", "pathological"])
def test_partitions_are_disjoint(make_cfg, partition):
    cfg = make_cfg(partition=partition, dirichlet_alpha=0.5, num_clients=5, num_coldstart_clients=2,
                   classes_per_client=2)
    everything = _all_indices(client_splits(cfg))
    assert len(np.unique(everything)) == len(everything)
    assert everything.min() >= 0 and everything.max() < cfg.synthetic_train_size


@pytest.mark.parametrize("partition", ["dirichlet", "iid"])
def test_partitions_cover_the_whole_training_set(make_cfg, partition):
    cfg = make_cfg(partition=partition, dirichlet_alpha=0.5, num_clients=4, num_coldstart_clients=1)
    np.testing.assert_array_equal(np.sort(_all_indices(client_splits(cfg))), np.arange(cfg.synthetic_train_size))


@pytest.mark.parametrize("partition", ["dirichlet", "iid"])
def test_train_subset_is_the_partitioned_pool(make_cfg, fresh_caches, partition):
    cfg = make_cfg(partition=partition, dirichlet_alpha=0.5, train_subset=120, num_clients=3,
                   num_coldstart_clients=1)
    pool = np.sort(_all_indices(client_splits(cfg)))
    assert len(pool) == 120 and len(np.unique(pool)) == 120
    assert pool.max() < cfg.synthetic_train_size
    fresh_caches()
    np.testing.assert_array_equal(np.sort(_all_indices(client_splits(cfg))), pool)
    other = np.sort(_all_indices(client_splits(cfg.replace(seed=3))))
    assert not np.array_equal(other, pool)  # the subset itself is drawn with the seed


def test_pathological_clients_hold_at_most_c_classes(make_cfg):
    cfg = make_cfg(partition="pathological", classes_per_client=2, num_clients=4, num_coldstart_clients=2)
    labels = load_dataset(cfg).train_y
    for tr, te in client_splits(cfg):
        assert len(np.unique(labels[np.concatenate([tr, te])])) <= 2


def test_dirichlet_small_alpha_is_label_skewed(make_cfg):
    cfg = make_cfg(partition="dirichlet", dirichlet_alpha=0.1, num_clients=4, num_coldstart_clients=1,
                   synthetic_train_size=400)
    labels = load_dataset(cfg).train_y
    top_share = []
    for tr, te in client_splits(cfg):
        counts = np.bincount(labels[np.concatenate([tr, te])], minlength=4)
        top_share.append(counts.max() / counts.sum())
    assert np.mean(top_share) > 0.5  # IID would give about 0.25-0.3


def test_local_split_is_stratified_80_20(make_cfg):
    cfg = make_cfg(partition="dirichlet", dirichlet_alpha=1.0, num_clients=3, num_coldstart_clients=1,
                   test_fraction=0.2)
    labels = load_dataset(cfg).train_y
    for tr, te in client_splits(cfg):
        assert len(np.intersect1d(tr, te)) == 0
        assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)  # sorted
        for cls in np.unique(labels[np.concatenate([tr, te])]):
            n_tr, n_te = (labels[tr] == cls).sum(), (labels[te] == cls).sum()
            assert n_te == int(round(0.2 * (n_tr + n_te)))


def test_stratified_split_by_hand():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    idx = np.arange(16)
    tr, te = stratified_split(idx, labels, 0.2, np.random.default_rng(0))
    assert sorted(labels[te].tolist()) == [0, 0, 1]  # round(2.0), round(1.0), round(0.2)
    assert len(tr) == 13 and len(np.intersect1d(tr, te)) == 0
    tr2, te2 = stratified_split(idx, labels, 0.2, np.random.default_rng(0))
    np.testing.assert_array_equal(te, te2)


def test_too_many_clients_for_the_data_is_a_clear_error(make_cfg):
    cfg = make_cfg(partition="iid", synthetic_train_size=10, num_clients=8, num_coldstart_clients=4)
    with pytest.raises(DataError, match="partition"):
        client_splits(cfg)


# ------------------------------------------------------------------ client tensors
def test_load_client_data_matches_the_split(make_cfg):
    cfg = make_cfg(partition="dirichlet", dirichlet_alpha=0.5)
    d = load_dataset(cfg)
    for pid in range(cfg.num_partitions):
        cd = load_client_data(cfg, pid)
        tr, te = client_splits(cfg)[pid]
        assert cd.train_x.dtype == torch.uint8
        assert tuple(cd.train_x.shape) == (len(tr), 3, cfg.image_size, cfg.image_size)
        assert cd.num_train == len(tr) and len(cd.test_y) == len(te)
        np.testing.assert_array_equal(cd.train_y.numpy(), d.train_y[tr])
        np.testing.assert_array_equal(cd.test_x.permute(0, 2, 3, 1).numpy(), d.train_x[te])
    assert [is_coldstart(cfg, p) for p in range(cfg.num_partitions)] == [False] * cfg.num_clients + [True]


@pytest.mark.parametrize("pid", [-1, 4])
def test_partition_id_out_of_range(make_cfg, pid):
    cfg = make_cfg()  # 3 + 1 partitions
    with pytest.raises(DataError, match=str(pid)):
        load_client_data(cfg, pid)


def test_global_test_set_and_subset(make_cfg):
    cfg = make_cfg(synthetic_test_size=60)
    x, y = load_global_test(cfg)
    assert tuple(x.shape) == (60, 3, cfg.image_size, cfg.image_size) and len(y) == 60
    np.testing.assert_array_equal(y.numpy(), load_dataset(cfg).test_y)
    sub = cfg.replace(global_test_subset=25)
    xs, ys = load_global_test(sub)
    assert len(ys) == 25 and tuple(xs.shape[1:]) == tuple(x.shape[1:])
    xs2, ys2 = load_global_test(sub)
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)
    # every subset image is one of the test images, with its own label
    flat = x.reshape(60, -1)
    for img, label in zip(xs.reshape(25, -1), ys):
        match = (flat == img).all(1).nonzero().flatten()
        assert len(match) >= 1 and int(y[match[0]]) == int(label)


# ------------------------------------------------------------------ batches
def test_batches_in_order_without_generator():
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(10)
    out = list(batches(x, y, 4, torch.device("cpu")))
    assert [len(b[1]) for b in out] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in out]), y)
    xb = torch.cat([b[0] for b in out])
    assert xb.dtype == torch.float32
    torch.testing.assert_close(xb, (x.float() / 255 - 0.5) / 0.25)
    assert normalize(torch.zeros(1, dtype=torch.uint8)).item() == -2.0
    assert normalize(torch.full((1,), 255, dtype=torch.uint8)).item() == 2.0


def test_unit_pixel_scale_feeds_the_model_values_in_0_1_for_training_and_evaluation():
    """pixel_scale=unit (NIID-Bench's inputs) reaches both the local batches and predictions."""
    from fedcoe_flwr.algorithms.training import predict_probs
    from fedcoe_flwr.config import from_dict
    x = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    (xb, _), = batches(x, torch.arange(6), 6, torch.device("cpu"), pixel_scale="unit")
    torch.testing.assert_close(xb, x.float() / 255)
    seen = []
    cfg = from_dict({"pixel_scale": "unit", "eval_batch_size": 4})
    predict_probs(lambda b: seen.append(b) or torch.ones(len(b), 10), x, cfg, torch.device("cpu"))
    torch.testing.assert_close(torch.cat(seen), x.float() / 255)


def test_batches_shuffle_is_a_seeded_permutation():
    x = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous()
    y = torch.arange(20)

    def order(seed):
        return torch.cat([yb for _, yb in batches(x, y, 6, torch.device("cpu"), torch.Generator().manual_seed(seed))])

    a, b, c = order(1), order(1), order(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(20)) and not torch.equal(a, y)
    for xb, yb in batches(x, y, 6, torch.device("cpu"), torch.Generator().manual_seed(1)):
        torch.testing.assert_close(xb[:, 0, 0, 0], (yb.float() / 255 - 0.5) / 0.25)  # pairs stay together


def test_augmented_batches_keep_shape_and_labels():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(8)
    g = torch.Generator().manual_seed(0)
    out = list(batches(x, y, 8, torch.device("cpu"), g, augment=True))
    assert len(out) == 1 and out[0][0].shape == (8, 3, 16, 16)
    assert sorted(out[0][1].tolist()) == y.tolist()
    assert not torch.equal(out[0][0], normalize(x[out[0][1]]))  # something was flipped or shifted
