"""Datasets for training and evaluation: an ImageNet-layout folder, Fashion-MNIST, or synthetic tensors; for
segmentation, a folder of images and masks, Pascal VOC 2012, or fashion-mnist-seg canvases (segmentation.py);
for detection, a COCO-format folder or fashion-mnist-det canvases (detection.py).

    from mobilenetv3.data import DataConfig, build_datasets, collate_skipping

    bundle = build_datasets(DataConfig(dataset="fashion-mnist"))
    loader = DataLoader(bundle.train, batch_size=256, shuffle=True, collate_fn=collate_skipping)

The contract (item format, bundle fields) is documented in `data/config.py`.
"""

from .build import BUILTIN_DATASETS, DatasetBundle, build_datasets, check_data_config, collate_skipping, same_dataset
from .config import DataConfig

__all__ = ["BUILTIN_DATASETS", "DataConfig", "DatasetBundle", "build_datasets", "check_data_config", "collate_skipping", "same_dataset"]
