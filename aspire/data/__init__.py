"""Datasets: the documented formats, annotations, and the toy benchmarks."""

from aspire.data.formats import FORMATS, Dataset, load_dataset
from aspire.data.images import ImageDataset, load_image, load_mask

__all__ = ["FORMATS", "Dataset", "ImageDataset", "load_dataset", "load_image", "load_mask"]
