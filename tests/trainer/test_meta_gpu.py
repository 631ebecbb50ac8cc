"""The CUDA-graph meta-iteration equals the eager one (GPU only)."""

import dataclasses

import pytest
import torch

from tests.trainer.test_meta import CFG, random_batch


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd"])
def test_cuda_graph_meta_iterations_equal_eager(algorithm):
    dev = torch.device("cuda")
    eager_cfg = dataclasses.replace(CFG, algorithm=algorithm, cuda_graph=False, device="cuda")
    graph_cfg = dataclasses.replace(CFG, algorithm=algorithm, cuda_graph=True, device="cuda")
    from trainer.meta import MetaLearner
    from trainer.train import model_spec

    eager = MetaLearner(eager_cfg, model_spec(eager_cfg), dev, torch.Generator().manual_seed(0))
    graph = MetaLearner(graph_cfg, model_spec(graph_cfg), dev, torch.Generator().manual_seed(0))
    for i in range(6):  # 3 warm-up updates, the capture, then replays with new data
        batch = tuple(t.to(dev) for t in random_batch(CFG, 4, seed=i))
        le, _ = eager.step(batch)
        lg, _ = graph.step(batch)
        torch.testing.assert_close(lg, le, atol=1e-4, rtol=1e-4)
    assert graph._graph is not None, "the graph path fell back to eager"
    for k, v in eager.params.items():
        if not (k.startswith("conv") and k.endswith(".bias")):
            torch.testing.assert_close(graph.params[k], v, atol=1e-4, rtol=1e-3)
