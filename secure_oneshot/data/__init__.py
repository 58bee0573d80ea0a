"""MedMNIST loading (offline root, any 2D flag and size) and site partitioning."""

from .medmnist_data import DATA_ENV, MedMNISTSplit, SiteData, load_medmnist, load_npz, to_dataset
from .partition import Partition, dirichlet_partition, iid_partition, partition_indices

__all__ = [
    "DATA_ENV",
    "MedMNISTSplit",
    "SiteData",
    "load_medmnist",
    "load_npz",
    "to_dataset",
    "Partition",
    "iid_partition",
    "dirichlet_partition",
    "partition_indices",
]
