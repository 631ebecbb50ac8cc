"""Architectures, the reference forward and inner loop, checkpoints and the bundled meta-initializations."""

from models.checkpoint import CheckpointError, MetaModel, load_checkpoint, save_checkpoint
from models.functional import forward, init_params, num_params, param_shapes, stack_params
from models.maml import AdaptResult, adapt, predict
from models.spec import ModelSpec

__all__ = [
    "AdaptResult", "CheckpointError", "MetaModel", "ModelSpec", "adapt", "forward", "init_params",
    "load_checkpoint", "num_params", "param_shapes", "predict", "save_checkpoint", "stack_params",
]
