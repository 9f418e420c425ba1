from .mobilenetv3 import MobileNetV3, MobileNetV3Features
from .registry import create_model, get_entry, list_models
from .spec import LARGE, NETWORK_SPECS, SMALL, Activation, BlockSpec, LayoutOptions, NetworkSpec, make_divisible

__all__ = [
    "LARGE", "NETWORK_SPECS", "SMALL", "Activation", "BlockSpec", "LayoutOptions", "MobileNetV3",
    "MobileNetV3Features", "NetworkSpec", "create_model", "get_entry", "list_models", "make_divisible",
]
