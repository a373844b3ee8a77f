"""Datasets: the CUB-200-2011 and class-folder readers (one sample interface) and the generators of the CUB layout."""

from icnn_compress.config import IMAGENET_MEAN, IMAGENET_STD
from icnn_compress.data.cub import CubDataset
from icnn_compress.data.fashion import generate_fashion_canvas
from icnn_compress.data.generate import generate_parts_dataset
from icnn_compress.data.imagefolder import ImageFolderDataset
from icnn_compress.data.keypoints import read_keypoints

__all__ = [
    "CubDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "generate_fashion_canvas",
    "generate_parts_dataset",
    "read_keypoints",
]
