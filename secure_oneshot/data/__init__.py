"""Site data: MedMNIST (offline root, any 2D flag and size), a site's own images (folder, CSV manifest, DICOM),
and site partitioning.

Names are imported on first use, so that ``secure_oneshot.data.sources`` (``data check``) loads without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "DATA_ENV": "medmnist_data",
    "MedMNISTSplit": "medmnist_data",
    "SiteData": "medmnist_data",
    "load_medmnist": "medmnist_data",
    "load_npz": "medmnist_data",
    "to_dataset": "medmnist_data",
    "Partition": "partition",
    "iid_partition": "partition",
    "dirichlet_partition": "partition",
    "partition_indices": "partition",
    "SourceConfig": "image_files",
    "load_source": "sources",
    "check_source": "sources",
    "source_site_data": "sources",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
