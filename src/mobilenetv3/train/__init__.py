"""Training and evaluation: `run(TrainConfig) -> summary`, configs and recipes, the loop, checkpoints.

    from mobilenetv3.train import load_config, run
    summary = run(load_config("fashion-mnist", overrides=[("epochs", 2), ("output", "runs/fm")]))
"""

from .config import TrainConfig, all_keys, list_recipes, load_config, to_dict
from .run import run

__all__ = ["TrainConfig", "all_keys", "list_recipes", "load_config", "run", "to_dict"]
