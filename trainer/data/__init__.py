"""Data sets and task samplers of the trainer: Omniglot, mini-ImageNet, sinusoid regression.

Loaders return raw uint8 pixels (decoded once, then cached); samplers draw whole batches of tasks on the device and
apply the float preprocessing there.
"""

from trainer.data.miniimagenet import load_miniimagenet, miniimagenet_classes, miniimagenet_sampler
from trainer.data.omniglot import (
    OmniglotData,
    download_omniglot,
    load_omniglot,
    omniglot_split,
    omniglot_split_indices,
    split_info,
)
from trainer.data.sampler import (
    TaskBatch,
    TaskSampler,
    invert_uint8,
    omniglot_sampler,
    scale_uint8,
)
from trainer.data.sinusoid import SinusoidSampler

__all__ = [
    "OmniglotData", "SinusoidSampler", "TaskBatch", "TaskSampler", "download_omniglot", "invert_uint8",
    "load_miniimagenet", "load_omniglot", "miniimagenet_classes", "miniimagenet_sampler", "omniglot_sampler",
    "omniglot_split", "omniglot_split_indices", "scale_uint8", "split_info",
]
