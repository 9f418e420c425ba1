"""MobileNetV3 (Howard et al., "Searching for MobileNetV3", 2019) for PyTorch."""

from .errors import UnknownModelError, UserError
from .models import MobileNetV3, MobileNetV3Features, create_model, list_models
from .preprocessing import Preprocessing
from .weights.io import load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "MobileNetV3", "MobileNetV3Features", "Preprocessing", "UnknownModelError", "UserError",
    "create_model", "list_models", "load_model", "save_model", "__version__",
]
