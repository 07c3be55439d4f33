"""Training: typed recipes, the resumable accelerate Trainer, crash-safe checkpoints, model cards.

    from hf_pcme.training import load_recipe, train
    result = train(load_recipe("configs/shapes_pcme.yaml", ["train.max_steps=20"]))
    result.model, result.processor, result.metrics, result.output_dir
"""

from .callbacks import StopTraining, TrainerCallback
from .checkpointing import CheckpointManager, find_latest_checkpoint, is_valid_checkpoint
from .config import DataRecipe, EvalRecipe, ModelRecipe, Recipe, TrainRecipe, load_recipe, recipe_from_dict
from .model_card import build_model_card, write_model_card
from .trainer import TrainResult, Trainer, train

__all__ = [
    "CheckpointManager",
    "DataRecipe",
    "EvalRecipe",
    "ModelRecipe",
    "Recipe",
    "TrainRecipe",
    "StopTraining",
    "TrainResult",
    "Trainer",
    "TrainerCallback",
    "build_model_card",
    "find_latest_checkpoint",
    "is_valid_checkpoint",
    "load_recipe",
    "recipe_from_dict",
    "train",
    "write_model_card",
]
