"""server.runner: a task's result does not depend on which other tasks share its engine call."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kernels.engine import Engine
from models.checkpoint import MetaModel
from models.functional import init_params, support_stats
from models.maml import adapt, predict
from models.preprocess import preprocess_uint8
from server.runner import AdaptJob, BatchRunner, PredictJob
from tests.server.conftest import TINY_SPECS, random_task

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def runner():
    return BatchRunner(Engine("reference", "cpu"))


def model_for(name: str) -> MetaModel:
    spec = TINY_SPECS[name]
    return MetaModel(spec, init_params(spec, torch.Generator().manual_seed(1)))


def jobs_for(model: MetaModel, count: int, queries=(3,), dtypes=(np.uint8,)) -> list[AdaptJob]:
    jobs = []
    for i in range(count):
        dtype = dtypes[i % len(dtypes)]
        sx, sy, qx = random_task(model.spec, queries=queries[i % len(queries)], seed=i, dtype=dtype)
        jobs.append(AdaptJob(model, sx, sy, steps=2, lr=None, query_x=qx))
    return jobs


@pytest.mark.parametrize("name", ["tiny-5w", "tiny-5w-td"])
def test_batched_tasks_equal_tasks_run_alone(runner, name):
    model = model_for(name)
    jobs = jobs_for(model, 4, queries=(3, 5), dtypes=(np.uint8, np.float32, np.float16))
    together = runner.adapt(jobs)
    for job, shared in zip(jobs, together):
        (alone,) = runner.adapt([job])
        np.testing.assert_allclose(shared.support_loss, alone.support_loss, **TOL)
        np.testing.assert_allclose(shared.support_accuracy, alone.support_accuracy, **TOL)
        np.testing.assert_allclose(shared.logits, alone.logits, **TOL)
        for k in alone.params:
            torch.testing.assert_close(shared.params[k], alone.params[k], **TOL)


def test_results_match_the_reference_inner_loop(runner):
    model = model_for("tiny-5w")
    (job,) = jobs_for(model, 1)
    (out,) = runner.adapt([job])
    x = preprocess_uint8(model.spec, torch.from_numpy(job.support_x.copy()))[None]
    q = preprocess_uint8(model.spec, torch.from_numpy(job.query_x.copy()))[None]
    ref = adapt(model.spec, model.params, x, torch.from_numpy(job.support_y)[None], 2, model.spec.inner_lr, track=True)
    np.testing.assert_allclose(out.support_loss, ref.support_loss[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(out.logits, predict(model.spec, ref.params, q, x)[0].numpy(), **TOL)
    # The cache keeps the support statistics under the adapted weights, not the support images.
    for key, value in support_stats(model.spec, ref.params, x).items():
        torch.testing.assert_close(out.stats[key], value[0], **TOL)


def test_cached_predict_batches_equal_alone_and_match_adapt_and_predict(runner):
    model = model_for("tiny-5w")
    jobs = jobs_for(model, 4)
    adapted = runner.adapt(jobs)
    predict_jobs = [PredictJob(model, a.params, a.stats, j.query_x) for a, j in zip(adapted, jobs)]
    together = runner.predict(predict_jobs)
    for pj, shared, a in zip(predict_jobs, together, adapted):
        (alone,) = runner.predict([pj])
        np.testing.assert_allclose(shared.logits, alone.logits, **TOL)
        np.testing.assert_allclose(shared.logits, a.logits, **TOL)


def test_skip_cache_keeps_nothing(runner):
    model = model_for("tiny-5w")
    (job,) = jobs_for(model, 1)
    job.keep = False
    (out,) = runner.adapt([job])
    assert out.params is None and out.stats is None and out.logits is not None


class CountingEngine(Engine):
    """The reference engine, counting its one-call adapt_predict calls (the path the GPU backends replay)."""

    def __init__(self):
        super().__init__("reference", "cpu")
        self.fused_calls = 0

    def adapt_predict(self, *args, **kwargs):
        self.fused_calls += 1
        return super().adapt_predict(*args, **kwargs)


def test_one_adapt_predict_call_when_every_task_has_the_same_queries():
    """Which engine path the runner takes (values: test_batched_tasks_equal_tasks_run_alone compares the mixed-Q
    path, adapt then one predict per query count, with each task alone on the one-call path)."""
    model = model_for("tiny-5w")
    counting = BatchRunner(CountingEngine())
    assert all(a.predict_s == 0.0 for a in counting.adapt(jobs_for(model, 3, queries=(4,))))  # all adapt time
    assert counting.engine.fused_calls == 1
    mixed = counting.adapt(jobs_for(model, 3, queries=(4, 5)))  # mixed query counts: adapt, then one predict per Q
    assert counting.engine.fused_calls == 1 and all(a.predict_s > 0.0 for a in mixed)


class _SmallDevice(Engine):
    """The real reference engine on a 'device' that holds at most `capacity` tasks per call (like a GPU under
    memory pressure): larger calls raise torch's OutOfMemoryError, as CUDA would."""

    def __init__(self, capacity: int):
        super().__init__("reference", "cpu")
        self.capacity, self.calls = capacity, []

    def adapt_predict(self, model, support_x, *args, **kwargs):
        self.calls.append(support_x.shape[0])
        if support_x.shape[0] > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().adapt_predict(model, support_x, *args, **kwargs)


def test_a_batch_the_device_cannot_hold_is_split_and_nothing_is_lost():
    model = model_for("tiny-5w")
    jobs = jobs_for(model, 5)
    small = BatchRunner(_SmallDevice(capacity=2))
    got = small(jobs[0].key, jobs)
    assert small.engine.calls == [5, 2, 3, 1, 2]  # 5 -> 2 + 3 -> 2 + (1 + 2)
    want = BatchRunner(Engine("reference", "cpu"))(jobs[0].key, jobs)
    assert len(got) == 5
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.logits, w.logits, **TOL)
        np.testing.assert_allclose(g.support_loss, w.support_loss, **TOL)


class _FewQueries(_SmallDevice):
    """Holds any number of tasks with at most 5 queries each; a task with more does not fit at all."""

    def adapt_predict(self, model, support_x, support_y, query_x, *args, **kwargs):  # one query count per batch
        self.calls.append(support_x.shape[0])
        if query_x.shape[1] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return Engine.adapt_predict(self, model, support_x, support_y, query_x, *args, **kwargs)

    def predict(self, model, fast, query_x, *args, **kwargs):  # mixed query counts: adapt, then predict per count
        if query_x.shape[1] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return Engine.predict(self, model, fast, query_x, *args, **kwargs)


def test_one_task_that_does_not_fit_fails_alone_and_its_batch_mates_get_their_results():
    from server.status import ResourceExhausted

    model = model_for("tiny-5w")
    jobs = jobs_for(model, 4, queries=(3, 3, 3, 9))  # same batch key: the query count is not part of it
    got = BatchRunner(_FewQueries(capacity=0))(jobs[0].key, jobs)
    want = BatchRunner(Engine("reference", "cpu"))(jobs[0].key, jobs[:3])
    assert isinstance(got[3], ResourceExhausted)
    assert re.search(r"ran out of memory for one task of model 'tiny-5w' \(5 support images, 9 queries, 2 steps\): "
                     r"CUDA out of memory", got[3].message)
    for g, w in zip(got[:3], want, strict=True):
        np.testing.assert_allclose(g.logits, w.logits, **TOL)
