"""Task chunks of the torch backends: the sizes that keep large batches legal, and that chunking changes no result."""

from __future__ import annotations

import pytest
import torch

from kernels.checks.oracles import exact_torch
from kernels.engine import ReferenceBackend
from kernels.engine.chunking import (
    CPU_BUDGET_BYTES,
    INDEX_LIMIT,
    default_budget,
    largest_tensor_elements,
    run_chunked,
    task_bytes,
    task_chunk,
)
from kernels.engine.graph import GraphBackend
from models.checkpoint import MetaModel
from models.functional import init_params
from models.maml import AdaptResult, adaptation_stats
from models.maml import adapt as reference_adapt
from models.maml import predict as reference_predict
from models.spec import ModelSpec

OMNIGLOT_20W = ModelSpec("o20", "conv4-omniglot", ways=20, inner_lr=0.1, steps=5)
MINI_5W = ModelSpec("m5", "conv4-miniimagenet", ways=5, inner_lr=0.01, steps=10)
TINY = ModelSpec("tiny", "conv4-omniglot", ways=3, inner_lr=0.4, steps=2, hidden=4, bn_policy="support")
TINY_MINI = ModelSpec("tiny-mini", "conv4-miniimagenet", ways=3, inner_lr=0.05, steps=2, hidden=4,
                      input_shape=(3, 16, 16))


def test_the_issue_batches_are_cut_below_the_32_bit_index_limit_and_the_memory_budget():
    # 1,024 tasks of 20-way 1-shot, predicted with 15 queries per class (300 rows a task)
    largest = largest_tensor_elements(OMNIGLOT_20W, 20, 300)
    assert largest == 300 * 64 * 14 * 14  # the first block's output, one task (predict: the query rows alone)
    assert 1024 * largest > INDEX_LIMIT  # what grouped convolution cannot index in one call
    chunk = task_chunk(OMNIGLOT_20W, 20, 300, budget_bytes=1 << 60)
    assert chunk * largest <= INDEX_LIMIT < (chunk + 1) * largest
    # 1,024 tasks of mini-ImageNet 5-way 1-shot with 75 queries on a 141 GB card (a quarter of it as budget)
    budget = 141 * 10**9 // 4
    chunk = task_chunk(MINI_5W, 5, 75, budget)
    assert chunk < 1024 and chunk * task_bytes(MINI_5W, 5, 75) <= budget
    assert task_bytes(MINI_5W, 5, 75) > 75 * 84 * 84 * 32 * 4  # at least one query activation
    # adapt alone touches only the support rows: far larger chunks
    assert task_chunk(OMNIGLOT_20W, 20, 0, 1 << 60) > 8 * task_chunk(OMNIGLOT_20W, 20, 300, 1 << 60)
    assert task_chunk(TINY, 3, 4, budget_bytes=1) == 1  # never zero
    assert task_chunk(ModelSpec("sin", "mlp-sinusoid", ways=1, inner_lr=0.01, steps=1), 10, 10, 1) > 1e6


def test_budget_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("FASTADAPT_REFERENCE_WORKSPACE_MB", "3")
    assert default_budget("cpu") == 3 * 2**20
    monkeypatch.delenv("FASTADAPT_REFERENCE_WORKSPACE_MB")
    assert default_budget("cpu") == CPU_BUDGET_BYTES == 32 * 2**20  # a speed setting on the CPU (bench-workspace)


def test_run_chunked_joins_results_along_the_task_axis():
    seen = []

    def fn(s):
        seen.append((s.start, s.stop))
        n = s.stop - s.start
        res = AdaptResult({"w": torch.arange(s.start, s.stop)}, torch.ones(3, n) * s.start, None)
        return res, torch.arange(s.start, s.stop).float()[:, None]

    res, logits = run_chunked(7, 3, fn)
    assert seen == [(0, 3), (3, 6), (6, 7)]
    assert res.params["w"].tolist() == list(range(7)) and res.support_loss.shape == (3, 7)
    assert res.support_accuracy is None and logits[:, 0].tolist() == list(range(7))
    assert run_chunked(3, 3, lambda s: (s.start, s.stop)) == (0, 3)  # one chunk: fn's own result, untouched


def _tasks(spec, tasks, queries, seed):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, spec.ways, *spec.input_shape, generator=g)
    sy = torch.stack([torch.randperm(spec.ways, generator=g) for _ in range(tasks)])
    return sx, sy, torch.rand(tasks, queries, *spec.input_shape, generator=g)


def _budget_for(spec, tasks_per_call, support, queries):
    return tasks_per_call * max(task_bytes(spec, support, 0), task_bytes(spec, support, queries))


@pytest.mark.parametrize("spec", [TINY, TINY.with_(bn_policy="transductive"), TINY_MINI], ids=lambda s: s.name +
                         "-" + s.bn_policy)
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["lr", "meta-sgd"])
def test_chunked_reference_and_graph_backends_equal_one_call(spec, meta_sgd):
    g = torch.Generator().manual_seed(5)
    model = MetaModel(spec, init_params(spec, g))
    lr = {k: torch.rand(v.shape, generator=g) * 0.3 for k, v in model.params.items()} if meta_sgd else 0.3
    sx, sy, qx = _tasks(spec, 5, 4, seed=6)
    want = reference_adapt(spec, model.params, sx, sy, 2, lr, track=True)
    with torch.no_grad():
        want_logits = reference_predict(spec, want.params, qx, sx)
        want_stats = adaptation_stats(spec, want.params, sx)
    budget = _budget_for(spec, 2, spec.ways, 4)  # 5 tasks -> calls of 2, 2 and 1
    assert task_chunk(spec, spec.ways, 4, budget) == 2
    reference = ReferenceBackend(budget_bytes=budget)
    graph = GraphBackend("cpu", capture=False, capture_after=1, budget_bytes=budget)
    for name, res, logits in [
        ("reference", reference.adapt(model, sx, sy, 2, lr, True), None),
        ("graph", *graph.adapt_predict(model, sx, sy, qx, 2, lr, True)),
    ]:
        for k, v in want.params.items():
            torch.testing.assert_close(res.params[k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: fast weight {k}")
        assert res.support_loss.shape == (3, 5), name
        torch.testing.assert_close(res.support_loss, want.support_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.support_accuracy, want.support_accuracy)
        for k, v in (want_stats or {}).items():
            torch.testing.assert_close(res.stats[k], v, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, k=k, name=name: f"{name} {k}: {m}")
        logits = reference.predict(model, res.params, qx, res.stats) if logits is None else logits
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5, msg=name)
    assert graph.captures == 2  # one bucket for the 2-task chunks, one for the last task
    torch.testing.assert_close(graph.predict(model, want.params, qx, want_stats), want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_reference_backend_takes_1024_tasks_of_20_way_with_300_queries():
    """The batch that makes one grouped convolution fail with a 32-bit index error runs, in chunks, and each task
    gets what it gets alone."""
    dev = torch.device("cuda")
    model = MetaModel(OMNIGLOT_20W, init_params(OMNIGLOT_20W, torch.Generator().manual_seed(1))).to(dev)
    sx, sy, _ = _tasks(OMNIGLOT_20W, 1024, 1, seed=2)
    qx = torch.rand(1024, 300, *OMNIGLOT_20W.input_shape, generator=torch.Generator().manual_seed(3))
    sx, sy, qx = sx.to(dev), sy.to(dev), qx.to(dev)
    backend = ReferenceBackend(dev)
    with exact_torch():  # no TF32 in cuDNN: both sides compute in fp32
        res = backend.adapt(model, sx, sy, 5, 0.1, True)
        logits = backend.predict(model, res.params, qx, res.stats)
        assert logits.shape == (1024, 300, 20) and torch.isfinite(logits).all()
        for t in (0, 533, 534, 1023):  # both sides of the chunk boundary
            alone = reference_adapt(OMNIGLOT_20W, model.params, sx[t:t + 1], sy[t:t + 1], 5, 0.1)
            with torch.no_grad():
                want = reference_predict(OMNIGLOT_20W, alone.params, qx[t:t + 1], sx[t:t + 1])
            torch.testing.assert_close(logits[t:t + 1], want, rtol=1e-4, atol=1e-4)


def test_mismatched_task_counts_are_refused_before_any_slicing():
    """A slice would silently drop the extra tasks of a longer tensor: each backend names the mismatch first."""
    model = MetaModel(TINY, init_params(TINY, torch.Generator().manual_seed(0)))
    sx, sy, qx = _tasks(TINY, 3, 4, seed=1)
    budget = _budget_for(TINY, 1, TINY.ways, 4)  # one task per call: every call would slice
    reference = ReferenceBackend(budget_bytes=budget)
    graph = GraphBackend("cpu", capture=False, budget_bytes=budget)
    for backend in (reference, graph):
        with pytest.raises(ValueError, match=r"support_y has shape \[4, 3\], expected \[3, 3\] for model tiny"):
            backend.adapt(model, sx, torch.cat([sy, sy[:1]]), 1, 0.3, False)
    adapted = reference.adapt(model, sx, sy, 1, 0.3, False)
    fast, stats = adapted.params, adapted.stats
    with pytest.raises(ValueError, match=r"fast\['conv0.weight'\] has shape \[2, 4, 1, 3, 3\], expected \[3, 4, "):
        reference.predict(model, {**fast, "conv0.weight": fast["conv0.weight"][:2]}, qx, stats)
    with pytest.raises(ValueError, match=r"stats\['bn0.mean'\] has shape \[2, 4\], expected \[3, 4\]"):
        graph.predict(model, fast, qx, {k: v[:2] for k, v in stats.items()})
    with pytest.raises(ValueError, match=r"query_x has shape \[2, 4, 1, 28, 28\], expected \[3, "):
        graph.adapt_predict(model, sx, sy, qx[:2], 1, 0.3)
