"""MobileNetV3 (Howard et al., "Searching for MobileNetV3", 2019) for PyTorch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import UnknownModelError, UserError
from .preprocessing import Preprocessing

__version__ = "0.1.0"

# The torch-backed API is imported on first use (PEP 562), so that commands which do not need torch
# (`predict` on a cached ONNX export) never import it (tests/test_layering.py).
_LAZY = {
    "MobileNetV3": ".models", "MobileNetV3Features": ".models", "create_model": ".factory",
    "list_models": ".models", "load_model": ".weights.io", "save_model": ".weights.io",
}

if TYPE_CHECKING:
    from .factory import create_model
    from .models import MobileNetV3, MobileNetV3Features, list_models
    from .weights.io import load_model, save_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "MobileNetV3", "MobileNetV3Features", "Preprocessing", "UnknownModelError", "UserError",
    "create_model", "list_models", "load_model", "save_model", "__version__",
]
