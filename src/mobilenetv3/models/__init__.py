"""The network (the paper's tables as data, its modules, MobileNetV3 and its features backbone) and the
registry of names -> builders.  Nothing here imports `weights`, `deploy` or `train`: `create_model` with
pretrained weights is `mobilenetv3.create_model` (`mobilenetv3.factory`)."""

from .mobilenetv3 import MobileNetV3, MobileNetV3Features
from .registry import ModelEntry, get_entry, list_models
from .spec import LARGE, NETWORK_SPECS, SMALL, Activation, BlockSpec, LayoutOptions, NetworkSpec, make_divisible

__all__ = [
    "LARGE", "NETWORK_SPECS", "SMALL", "Activation", "BlockSpec", "LayoutOptions", "MobileNetV3",
    "MobileNetV3Features", "ModelEntry", "NetworkSpec", "get_entry", "list_models", "make_divisible",
]
