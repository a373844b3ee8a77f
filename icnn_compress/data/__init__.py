"""Datasets: the CUB-200-2011 layout reader and the generators that write that layout."""

from icnn_compress.data.cub import IMAGENET_MEAN, IMAGENET_STD, CubDataset
from icnn_compress.data.fashion import generate_fashion_canvas
from icnn_compress.data.generate import generate_parts_dataset

__all__ = [
    "CubDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "generate_fashion_canvas",
    "generate_parts_dataset",
]
