"""Data layer: decode once, cache uint8 arrays, partition with flwr-datasets,
split each client 80/20 stratified, everything deterministic from one seed.

Sources: torchvision CIFAR-10/100 (downloaded only into ``./data`` or an existing
folder, when ``download`` is on), any image folder or ``.tar.gz`` with
``train/<class>/*`` and ``test/<class>/*`` (also how a real site's data looks), and a
small generated data set for tests.

Decoded images are cached on disk as one ``.npy`` per array, memory-mapped by every
process that reads them. A cache is named by the size and times of every file its
source's decoding reads (found by one directory walk, no image opened), so a changed,
added, removed or corrupt image is decoded again, never served stale.

Missing data is a :class:`MissingDataError` whose hint depends on ``mode``: ``"simulation"``
(and research-mode deployment: a partition of the data set the run config names) is
fixed through the run config, ``"deployment"`` (a site with its own images) through a
SuperNode's node config.
"""

from .cache import through_cache
from .client_data import clear_cache as clear_client_data
from .client_data import (ClientData, batches, load_client_data, load_global_test, load_site_data, load_site_images,
                          normalize, to_tensor_images)
from .dataset import clear_cache as clear_dataset
from .dataset import data_key, federation_classes, load_dataset
from .partition import clear_cache as clear_partitions
from .partition import client_splits, is_coldstart, stratified_split
from .sources import (IMAGE_SUFFIXES, MODES, DataError, ImageData, MissingDataError, Mode, decode_image,
                      is_image_folder_source, read_image_folder)

__all__ = ["IMAGE_SUFFIXES", "MODES", "ClientData", "DataError", "ImageData", "MissingDataError", "Mode", "batches",
           "clear_caches", "client_splits", "data_key", "decode_image", "federation_classes", "is_coldstart",
           "is_image_folder_source", "load_client_data", "load_dataset", "load_global_test", "load_site_data",
           "load_site_images", "normalize", "read_image_folder", "stratified_split", "through_cache",
           "to_tensor_images"]


def clear_caches() -> None:
    """Forget everything the data layer memoised in this process (tests, benchmarks)."""
    for clear in (clear_client_data, clear_dataset, clear_partitions):
        clear()
