"""torch.hub entry points: one per registered model name.

    model = torch.hub.load("OWNER/mobilenetv3", "mobilenetv3_large_100", pretrained="torchvision")
    model = torch.hub.load("path/to/checkout", "mobilenetv3_small_100", source="local", num_classes=10)

`pretrained` takes what `mobilenetv3.create_model` takes (True, "torchvision", "timm", "tf", a tag such as
"timm.miil_in21k_ft_in1k", or a path/URL of a weights file); other keyword arguments go to the model.
"""

import os
import sys

dependencies = ["torch", "torchvision", "safetensors"]

# torch.hub imports this file from a plain checkout, where the src/ layout is not installed.
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from mobilenetv3.factory import create_model as _create_model  # noqa: E402
from mobilenetv3.models.registry import get_entry as _get_entry  # noqa: E402
from mobilenetv3.models.registry import list_models as _list_models  # noqa: E402


def _entry_point(name):
    def entry_point(pretrained=False, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (
        f"{_get_entry(name).description}.\n\n"
        "pretrained: False, True, 'torchvision', 'timm', 'tf', 'SOURCE.TAG', or a path/URL of a weights file.\n"
        "**kwargs: MobileNetV3 arguments (num_classes, in_chans, drop_rate, features_only, out_indices, ...)."
    )
    return entry_point


for _name in _list_models():
    globals()[_name] = _entry_point(_name)
