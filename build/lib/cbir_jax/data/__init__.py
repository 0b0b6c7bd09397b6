"""Image sources (`data=`); importing this package registers all of them."""

from cbir_jax.data.base import DATASETS, DataError, ImageDataset, ImageLoadError, ImageReadError, build_dataset
from cbir_jax.data import caltech101, embedded, folder  # noqa: F401  (register the sources)

__all__ = ["DATASETS", "DataError", "ImageDataset", "ImageLoadError", "ImageReadError", "build_dataset"]
