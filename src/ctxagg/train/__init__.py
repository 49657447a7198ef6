"""Training, evaluation and comparison on real data (`ctxagg train / eval / compare`)."""
from .config import RECIPES, TrainConfig
from .engine import TrainResult, train

__all__ = ["TrainConfig", "RECIPES", "train", "TrainResult"]
