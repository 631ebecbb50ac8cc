"""Benchmark configurations (the few-shot problems), the device matrices, and the synthetic tasks they run on.

One benchmark call = adapt K steps on the support sets + predict the query sets, for all T tasks at once.
Tasks are synthetic but learnable: per task and class a random prototype image, examples = prototype + Gaussian noise
(clipped to [0, 1]), balanced shuffled labels, and a seeded Xavier meta-initialization. Speed does not depend on the
pixel values; learnability does matter for the cross-check: on pure-noise images K large SGD steps are chaotic and
float32 rounding differences between methods grow to 1e-2 in a quarter of the 20-way tasks, while on these tasks
adaptation converges (query accuracy ~97%) and most tasks agree to 1e-5. Every method sees the same tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from models.checkpoint import MetaModel
from models.functional import init_params
from models.spec import ModelSpec


@dataclass(frozen=True)
class BenchConfig:
    name: str
    arch: str
    ways: int
    shots: int
    queries: int  # query images per task (all classes together)
    steps: int
    lr: float
    hidden: int = 0  # 0: the architecture's default width
    bn_policy: str = "support"

    @property
    def support(self) -> int:
        return self.ways * self.shots

    def spec(self, bn_policy: str | None = None) -> ModelSpec:
        return ModelSpec(self.name, self.arch, self.ways, self.lr, self.steps, bn_policy or self.bn_policy,
                         hidden=self.hidden)

    def describe(self) -> str:
        return (f"{self.arch}, {self.ways}-way {self.shots}-shot, {self.steps} steps, lr {self.lr}, "
                f"{self.queries} queries per task")

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's settings: Omniglot 5-way (lr 0.4) and 20-way (lr 0.1, 5 steps), mini-ImageNet (lr 0.01, 10 test steps).
# Queries: 15 per class everywhere (75 for 5-way, 300 for 20-way), the usual meta-test protocol.
CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in (
        BenchConfig("omniglot-5w1s", "conv4-omniglot", ways=5, shots=1, queries=75, steps=10, lr=0.4),
        BenchConfig("omniglot-20w1s", "conv4-omniglot", ways=20, shots=1, queries=300, steps=5, lr=0.1),
        BenchConfig("miniimagenet-5w1s", "conv4-miniimagenet", ways=5, shots=1, queries=75, steps=10, lr=0.01),
        # The smallest thing that exercises every code path: the harness test and the dry GPU check run it.
        BenchConfig("tiny", "conv4-omniglot", ways=5, shots=1, queries=10, steps=2, lr=0.4, hidden=8),
        BenchConfig("tiny-20w", "conv4-omniglot", ways=20, shots=1, queries=20, steps=1, lr=0.1, hidden=8),
    )
}

# config -> task counts T, per matrix. `cpu` is sized so `make bench` on a 2-core CPU takes a few minutes.
MATRICES: dict[str, dict[str, list[int]]] = {
    "gpu": {
        "omniglot-5w1s": [1, 16, 128, 1024],
        "omniglot-20w1s": [1, 16, 128, 1024],
        "miniimagenet-5w1s": [1, 16, 128, 1024],
    },
    "cpu": {"omniglot-5w1s": [1, 16, 64], "omniglot-20w1s": [1, 4], "miniimagenet-5w1s": [1]},
    "tiny": {"tiny": [1, 2]},
}


@dataclass
class Case:
    """One (config, T) point: the model and the task batch every method runs on."""

    config: BenchConfig
    spec: ModelSpec
    model: MetaModel
    support_x: torch.Tensor  # [T, N*K, C, H, W] float32
    support_y: torch.Tensor  # [T, N*K] int64
    query_x: torch.Tensor  # [T, Q, C, H, W] float32
    device: torch.device
    query_y: torch.Tensor | None = None  # [T, Q] int64: for the accuracy sanity check, not used by any method

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def lr(self) -> float:
        return self.config.lr

    @property
    def shots(self) -> int:
        return self.config.shots

    @property
    def bn_policy(self) -> str:
        return self.spec.bn_policy


def make_model(config: BenchConfig, device: torch.device, seed: int = 0, bn_policy: str | None = None) -> MetaModel:
    spec = config.spec(bn_policy)
    params = init_params(spec, torch.Generator().manual_seed(seed))
    return MetaModel(spec, params).to(device)


NOISE = 0.3  # std of the per-example noise around its class prototype (pixels in [0, 1])


def _balanced_labels(tasks: int, ways: int, count: int, gen: torch.Generator, device) -> torch.Tensor:
    """[T, count] labels, each class count // ways times (the first count % ways classes once more), shuffled."""
    labels = torch.arange(count, device=device) % ways
    order = torch.argsort(torch.rand(tasks, count, generator=gen, device=device), dim=1)
    return labels[order].contiguous()


def make_case(config: BenchConfig, model: MetaModel, tasks: int, device: torch.device, seed: int = 0) -> Case:
    """T synthetic tasks, generated on `device` (1024 mini-ImageNet tasks are gigabytes: no host round trip)."""
    if tasks < 1:
        raise ValueError(f"tasks={tasks}, expected >= 1")
    gen = torch.Generator(device=device).manual_seed(seed * 7919 + tasks)
    shape = model.spec.input_shape
    protos = torch.rand(tasks, config.ways, *shape, generator=gen, device=device)
    rows = torch.arange(tasks, device=device).unsqueeze(1)

    def examples(labels: torch.Tensor) -> torch.Tensor:
        x = protos[rows, labels]
        x.add_(torch.randn(x.shape, generator=gen, device=device), alpha=NOISE)
        return x.clamp_(0, 1)

    support_y = _balanced_labels(tasks, config.ways, config.support, gen, device)
    query_y = _balanced_labels(tasks, config.ways, config.queries, gen, device)
    return Case(config, model.spec, model, examples(support_y), support_y, examples(query_y), device, query_y)
