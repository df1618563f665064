"""cifarkit: train, evaluate, inspect, save/load, export and serve small-image classifiers.

    import cifarkit
    cfg = cifarkit.resolve_config("tutorial", overrides={"data": "path/to/images", "epochs": 2})
    summary = cifarkit.train(cfg)
    ckpt = cifarkit.load_checkpoint(summary["run_dir"] + "/best.ckpt")
    result, _ = cifarkit.evaluate_checkpoint(ckpt, split="val")
"""
from .errors import CifarkitError
from .config import TrainConfig, RECIPES, list_recipes, resolve as resolve_config
from .models import create_model, list_models, register_model, count_parameters
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint, export_safetensors, export_pickle
from .training import fit, train
from .evaluate import evaluate, evaluate_checkpoint
from .predict import Predictor
from .data import load_data

__version__ = "0.1.0"

__all__ = [
    "CifarkitError", "TrainConfig", "RECIPES", "list_recipes", "resolve_config", "create_model",
    "list_models", "register_model", "count_parameters", "Checkpoint", "load_checkpoint",
    "save_checkpoint", "export_safetensors", "export_pickle", "train", "fit", "evaluate",
    "evaluate_checkpoint", "Predictor", "load_data", "__version__",
]
