"""The training preprocessing of each architecture, shared by the trainer and the server.

uint8 input means raw pixels as the data set stores them, already resized to the model's input size:
- Omniglot (conv4-omniglot, mlp-omniglot): 28x28 grayscale with dark strokes on white, as the PNGs store them;
  preprocessing scales to [0, 1] and inverts, so strokes are 1.0 and the background 0.0 (as cbfinn/maml).
- mini-ImageNet: 84x84 RGB, channels first; preprocessing scales to [0, 1].
Float input is taken as already preprocessed.
"""

from __future__ import annotations

import torch

from models.spec import ModelSpec


def preprocess_uint8(spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., C, H, W] -> float32 model input, on x's device."""
    if x.dtype != torch.uint8:
        raise TypeError(f"preprocess_uint8 takes uint8 pixels, got {x.dtype}")
    if spec.arch in ("conv4-omniglot", "mlp-omniglot"):
        return 1.0 - x.float().div_(255.0)
    if spec.arch == "conv4-miniimagenet":
        return x.float().div_(255.0)
    raise ValueError(f"model {spec.name} ({spec.arch}) takes float input only, got uint8")
