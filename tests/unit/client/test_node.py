"""Who a node is (node config: a site or a partition), its site data, and its profile reply."""

from __future__ import annotations

import subprocess
import pytest
import torch
from flwr.app import Message, RecordDict
from harness import make_image_folder, context

from fedcoe_flwr.client import handlers as client
from fedcoe_flwr.client.node import NodeConfigError, node_role
from fedcoe_flwr.data import DataError, load_global_test, load_site_data
from fedcoe_flwr.records import CONFIG, EXPERIMENT, experiment_record


# ------------------------------------------------------------------ node config -> role
def test_node_role_from_site_and_partition_configs(make_cfg):
    cfg = make_cfg(num_clients=3, num_coldstart_clients=2)
    site = node_role(context({"data-dir": "/data/a", "site-id": 2}))
    assert (site.mode, site.key, site.index(cfg), site.coldstart) == ("site", "site-2", 2, False)
    cold = node_role(context({"data-dir": "/data/b", "site-id": 1, "cold-start": True, "state-dir": "/s"}))
    assert (cold.key, cold.index(cfg), cold.state_dir) == ("coldstart-1", 4, "/s")  # num_clients + site-id
    part = node_role(context({"partition-id": 3, "num-partitions": 5}))
    assert (part.mode, part.key, part.index(cfg), part.num_partitions) == ("partition", "partition-3", 3, 5)


@pytest.mark.parametrize("node_config, match", [
    ({}, "neither which site nor which partition"),
    ({"data-dir": "/d"}, "both data-dir and site-id"),
    ({"data-dir": "/d", "site-id": 0, "partition-id": 0, "num-partitions": 2}, "mixes a site"),
    ({"data-dir": "/d", "site-id": "x"}, "site-id must be an integer"),
    ({"data-dir": "/d", "site-id": 0, "cold-start": "maybe"}, "cold-start must be true or false"),
])
def test_bad_node_config_says_what_to_pass(node_config, match):
    with pytest.raises(NodeConfigError, match=match):
        node_role(context(node_config))


def test_site_id_outside_the_federation_is_an_error(make_cfg):
    cfg = make_cfg(num_clients=2, num_coldstart_clients=1)
    with pytest.raises(NodeConfigError, match="training site-id 2 is outside 0..1"):
        node_role(context({"data-dir": "/d", "site-id": 2})).index(cfg)
    with pytest.raises(NodeConfigError, match="cold-start site-id 1 is outside 0..0"):
        node_role(context({"data-dir": "/d", "site-id": 1, "cold-start": True})).index(cfg)


def images(x: torch.Tensor) -> list[bytes]:
    """A batch of images as a sorted list of their bytes (order-free comparison)."""
    return sorted(bytes(row) for row in x.reshape(len(x), -1).numpy())


def test_exported_sites_hold_exactly_the_research_mode_data(sites):
    cfg, folders = sites
    from fedcoe_flwr.data import load_client_data

    for index in range(cfg.num_partitions):
        folder = folders.training[index] if index < cfg.num_clients else folders.coldstart[index - cfg.num_clients]
        site, part = load_site_data(folder, cfg), load_client_data(cfg, index)
        for a, b in ((site.train_x, part.train_x), (site.test_x, part.test_x)):
            assert a.shape == b.shape
            assert images(a) == images(b)  # the same images (PNG is lossless), in another order
        assert sorted(site.train_y.tolist()) == sorted(part.train_y.tolist())
    gx, gy = load_global_test(cfg.replace(global_test_dir=str(folders.global_test)))
    ref_x, ref_y = load_global_test(cfg)
    assert images(gx) == images(ref_x) and sorted(gy.tolist()) == sorted(ref_y.tolist())


def test_site_labels_follow_the_federation_label_space(tmp_path, make_cfg):
    root = make_image_folder(tmp_path / "site-a", {"train": {"bee": 2, "cat": 3}, "test": {"cat": 1}})
    cfg = make_cfg(class_names="cat,dog,bee,ant", image_size=8)
    data = load_site_data(root, cfg)
    assert sorted(data.train_y.tolist()) == [0, 0, 0, 2, 2] and data.test_y.tolist() == [0]


def test_site_with_an_unknown_class_names_folder_and_class(tmp_path, make_cfg):
    root = make_image_folder(tmp_path / "site-b", {"train": {"ant": 2, "cat": 2}, "test": {"ant": 1}})
    with pytest.raises(DataError, match=r"site-b.*\['cat'\].*train/cat"):
        load_site_data(root, make_cfg(class_names="ant,bee", image_size=8))


def test_site_data_errors_name_the_folder(tmp_path, make_cfg):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_site_data(tmp_path / "nowhere", make_cfg(class_names="a,b"))
    root = make_image_folder(tmp_path / "site-c")
    with pytest.raises(DataError, match="needs class_names"):
        load_site_data(root, make_cfg(class_names=""))


def test_site_data_from_a_tar_gz_and_its_cache(tmp_path, make_cfg):
    root = make_image_folder(tmp_path / "site-d")
    archive = tmp_path / "site-d.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(tmp_path), "site-d"], check=True)
    cfg = make_cfg(class_names="ant,bee,cat", image_size=8)
    a = load_site_data(root, cfg)
    b = load_site_data(archive, cfg, cache_dir=tmp_path / "cache")
    c = load_site_data(archive, cfg, cache_dir=tmp_path / "cache")  # from the cache
    assert len(list((tmp_path / "cache").glob("site-*"))) == 1
    for x in (b, c):  # archive order differs from the sorted folder walk: compare as sets of images
        assert images(x.train_x) == images(a.train_x) and sorted(x.test_y.tolist()) == sorted(a.test_y.tolist())
    assert torch.equal(b.train_x, c.train_x) and torch.equal(b.train_y, c.train_y)  # the cache is exact


# ------------------------------------------------------------------ ClientApp handlers in site mode
def test_profile_gives_site_index_and_federation_size(sites):
    cfg, folders = sites
    query = Message(content=RecordDict({EXPERIMENT: experiment_record(cfg)}), dst_node_id=11,
                    message_type="query.profile")
    cold = client.handle_profile(query, context({"data-dir": str(folders.coldstart[0]), "site-id": 0,
                                                 "cold-start": True}))
    info = dict(cold.content.config_records[CONFIG])
    assert (info["partition-id"], info["num-partitions"], info["site"]) == (3, 4, "coldstart-0")
    # research mode answers as before, with or without the experiment in the query
    bare = Message(content=RecordDict(), dst_node_id=11, message_type="query.profile")
    info = dict(client.handle_profile(bare, context({"partition-id": 2, "num-partitions": 4})).content
                .config_records[CONFIG])
    assert (info["partition-id"], info["num-partitions"]) == (2, 4)
    # a site whose folder holds a class the federation does not know is stopped at discovery
    bad = make_image_folder(folders.root / "bad", {"train": {"bee": 1}, "test": {"bee": 1}})
    with pytest.raises(DataError, match="bee"):
        client.handle_profile(query, context({"data-dir": str(bad), "site-id": 0}))
