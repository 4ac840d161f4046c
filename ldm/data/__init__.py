"""Data sets (synthetic shapes, image folders, webdataset shards) and the Lightning DataModule."""

from __future__ import annotations

from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset
from ldm.data.folder import ImageCaptionFolder, ImageTransform
from ldm.data.shards import WebDatasetShards
from ldm.data.synthetic import SyntheticShapes, caption_for

__all__ = [
    "DataModuleFromConfig",
    "ImageCaptionFolder",
    "ImageTransform",
    "SyntheticShapes",
    "WebDatasetShards",
    "WrappedDataset",
    "caption_for",
]
