"""`data=caltech101`: the seed's dataset through `tfds.data_source` (random access, no TensorFlow).

Nothing is downloaded at run time. A user with internet prepares it once:
    python -c "import tensorflow_datasets as tfds; tfds.data_source('caltech101', download=True)"
(or sets data.tfds_data_dir to a folder holding a prepared copy).
"""

from __future__ import annotations

import numpy as np

from cbir_jax.data.base import DATASETS, DataError, ImageDataset, hash_strings

BACKGROUND = "BACKGROUND_Google"


@DATASETS.register("caltech101")
def build(cfg) -> ImageDataset:
    import tensorflow_datasets as tfds  # imported here: slow to import, and only this source needs it

    try:
        source = tfds.data_source(
            "caltech101", split=cfg.tfds_split, data_dir=cfg.tfds_data_dir, download=False
        )
        builder = tfds.builder("caltech101", data_dir=cfg.tfds_data_dir)
        class_names = list(builder.info.features["label"].names)
        version = str(builder.info.version)
    except Exception as e:  # tfds raises assorted types for a dataset that is not prepared
        raise DataError(
            f"data=caltech101: not prepared in {cfg.tfds_data_dir or 'the default tfds data dir'} "
            f"({type(e).__name__}); prepare it once with internet (see README)"
        ) from None
    n = len(source)
    labels = np.empty(n, np.int32)
    ids = []
    for i in range(n):
        record = source[i]
        labels[i] = int(record["label"])
        name = record.get("image/file_name", b"")
        name = name.decode() if isinstance(name, bytes) else str(name)
        ids.append(f"{cfg.tfds_split}/{i:05d}" + (f"/{name}" if name else ""))
    if cfg.max_per_class:
        keep = np.concatenate([np.nonzero(labels == c)[0][: cfg.max_per_class] for c in np.unique(labels)])
        keep.sort()
    else:
        keep = np.arange(n)
    index = keep.tolist()

    def load(i: int) -> np.ndarray:
        image = np.asarray(source[index[i]]["image"])
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        return image.astype(np.uint8)

    return ImageDataset(
        name="caltech101",
        ids=[ids[i] for i in index],
        load=load,
        labels=labels[keep],
        class_names=class_names,
        content_key=hash_strings("caltech101", version, cfg.tfds_split, str(len(index)), *ids[:50]),
    )
