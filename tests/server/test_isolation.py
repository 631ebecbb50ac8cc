"""One request's failure is its own: a task that fails inside the engine, diverges, or loses the device.

The engine stand-ins here wrap the real reference Engine: they raise for one marked task (any exception, not only
out of memory), so the runner must bisect the batch; every other task's result is compared with the same task run
alone through the unmodified engine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from kernels.engine import Engine
from models.checkpoint import MetaModel
from models.functional import init_params
from server.client import FastAdaptClient
from server.runner import AdaptJob, AdaptOutcome, BatchRunner, DeviceLost, PredictJob
from server.status import Internal, InvalidArgument
from tests.server.conftest import TINY_SPECS, random_task

MARK = 7  # a support image whose first pixel is 7 marks the task the stand-in fails on
TOL = {"atol": 1e-5, "rtol": 1e-5}


def model_for(name: str = "tiny-5w") -> MetaModel:
    spec = TINY_SPECS[name]
    return MetaModel(spec, init_params(spec, torch.Generator().manual_seed(3)))


def jobs_for(model: MetaModel, count: int, marked: int | None = None, lr=None) -> list[AdaptJob]:
    jobs = []
    for i in range(count):
        sx, sy, qx = random_task(model.spec, queries=4, seed=10 + i)
        sx = sx.copy()
        sx.reshape(sx.shape[0], -1)[:, 0] = MARK if i == marked else 0
        jobs.append(AdaptJob(model, sx, sy, steps=2, lr=lr, query_x=qx))
    return jobs


class FailsOnMarkedTask(Engine):
    """The reference engine, except that a batch holding the marked task raises `error` (as a kernel limit,
    a bug or a driver error would), before any result exists."""

    def __init__(self, error: Exception):
        super().__init__("reference", "cpu")
        self.error, self.calls = error, []

    def _check(self, support_x):
        # Omniglot preprocessing is 1 - x/255: unmarked tasks' first pixel is 1.0, the marked task's 1 - 7/255.
        first_pixels = support_x.reshape(support_x.shape[0], support_x.shape[1], -1)[:, 0, 0]
        self.calls.append(support_x.shape[0])
        if bool((first_pixels < 0.99).any()):
            raise self.error

    def adapt(self, model, support_x, *args, **kwargs):
        self._check(support_x)
        return super().adapt(model, support_x, *args, **kwargs)

    def adapt_predict(self, model, support_x, *args, **kwargs):
        self._check(support_x)
        return super().adapt_predict(model, support_x, *args, **kwargs)


@pytest.mark.parametrize("error", [ValueError("needs 70000 blocks on grid axis 1"), KeyError("conv0.weight"),
                                   RuntimeError("an assertion inside a backend")])
def test_any_engine_failure_fails_only_its_own_task(error):
    model = model_for()
    jobs = jobs_for(model, 5, marked=3)
    engine = FailsOnMarkedTask(error)
    outcomes = BatchRunner(engine)(("adapt",), jobs)
    plain = BatchRunner(Engine("reference", "cpu"))
    assert isinstance(outcomes[3], Internal)
    assert type(error).__name__ in outcomes[3].message and "tiny-5w" in outcomes[3].message
    assert "5 support images, 4 queries, 2 steps" in outcomes[3].message
    for i in (0, 1, 2, 4):
        assert isinstance(outcomes[i], AdaptOutcome)
        (alone,) = plain.adapt([jobs[i]])
        np.testing.assert_allclose(outcomes[i].logits, alone.logits, **TOL)
        np.testing.assert_allclose(outcomes[i].support_loss, alone.support_loss, **TOL)
    assert engine.calls[0] == 5 and 1 in engine.calls  # bisected down to the failing task alone


def test_a_diverging_adaptation_is_refused_naming_inner_lr_and_the_step_and_kept_nowhere():
    model = model_for()
    runner = BatchRunner(Engine("reference", "cpu"))
    outcomes = runner.adapt(jobs_for(model, 2, lr=1e30))  # the batch key holds lr: one lr per batch
    for out in outcomes:
        assert isinstance(out, InvalidArgument), out
        assert "diverged with inner_lr = 1e+30" in out.message and "after step" in out.message
        assert "nothing was kept" in out.message


def test_a_task_with_huge_inputs_fails_alone_and_its_batch_mates_are_served():
    model = model_for()
    good = jobs_for(model, 2)
    sx = np.full(good[0].support_x.shape, 3e38, np.float32)  # finite, but the first convolution overflows
    huge = AdaptJob(model, sx, good[0].support_y, 2, None, good[0].query_x)
    runner = BatchRunner(Engine("reference", "cpu"))
    outcomes = runner.adapt([good[0], huge, good[1]])
    assert isinstance(outcomes[1], InvalidArgument)
    assert "support_x gives a non-finite support loss" in outcomes[1].message
    assert "before the first step" in outcomes[1].message
    for i, job in ((0, good[0]), (2, good[1])):
        (alone,) = runner.adapt([job])
        np.testing.assert_allclose(outcomes[i].logits, alone.logits, **TOL)
        assert all(torch.isfinite(v).all() for v in outcomes[i].params.values())


def test_predict_with_huge_query_values_is_refused_not_returned():
    model = model_for()
    runner = BatchRunner(Engine("reference", "cpu"))
    (adapted,) = runner.adapt(jobs_for(model, 1))
    good_q = jobs_for(model, 1)[0].query_x
    bad_q = np.full(good_q.shape, 3e38, np.float32)
    outcomes = runner.predict([PredictJob(model, adapted.params, adapted.stats, good_q),
                               PredictJob(model, adapted.params, adapted.stats, bad_q)])
    assert np.isfinite(outcomes[0].logits).all()
    assert isinstance(outcomes[1], InvalidArgument) and "query_x gives non-finite logits" in outcomes[1].message


def test_a_sticky_device_error_fails_fast_and_reports_the_device_lost():
    model = model_for()
    engine = FailsOnMarkedTask(RuntimeError("CUDA error: an illegal memory access was encountered"))
    lost = []
    runner = BatchRunner(engine, on_fatal=lost.append)
    outcomes = runner(("adapt",), jobs_for(model, 4, marked=0))
    assert all(isinstance(o, DeviceLost) for o in outcomes)  # no bisection: every retry would fail too
    assert engine.calls == [4] and len(lost) == 1
    assert "illegal memory access" in outcomes[0].message and "retry on another replica" in outcomes[0].message
    later = runner(("adapt",), jobs_for(model, 2))  # nothing reaches the lost device again
    assert all(isinstance(o, DeviceLost) for o in later) and engine.calls == [4]


def test_through_the_wire_a_failing_task_fails_alone_and_its_batch_mates_are_answered(make_server):
    """Review T8: requests that pass validation and share one engine call; the engine fails on one task (a stand-in
    wraps the real engine); the other clients get exactly what the plain engine gives, the failing one INTERNAL."""
    server = make_server(max_wait_ms=500, batch_wait="fixed", max_batch=8)
    real = server.engine.adapt_predict
    calls = []

    def fails_on_marked(model, support_x, *args, **kwargs):
        calls.append(support_x.shape[0])
        if bool((support_x.reshape(support_x.shape[0], support_x.shape[1], -1)[:, 0, 0] < 0.99).any()):
            raise ValueError("a kernel limit inside the engine")
        return real(model, support_x, *args, **kwargs)

    server.engine.adapt_predict = fails_on_marked
    model = model_for()
    jobs = jobs_for(model, 4, marked=2)

    def one(job):
        with FastAdaptClient(server.address, timeout=30) as client:
            try:
                return client.adapt_and_predict("tiny-5w", job.support_x, job.support_y, job.query_x, keep=False)[1]
            except grpc.RpcError as err:
                return err

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, jobs))
    assert calls[0] == 4  # all four shared the first engine call
    assert isinstance(results[2], grpc.RpcError) and results[2].code() == grpc.StatusCode.INTERNAL
    assert "a kernel limit inside the engine" in results[2].details()
    server.engine.adapt_predict = real
    served = BatchRunner(Engine("reference", "cpu"))
    for i in (0, 1, 3):
        (alone,) = served.adapt([AdaptJob(server.registry.get("tiny-5w"), jobs[i].support_x, jobs[i].support_y,
                                          server.registry.get("tiny-5w").spec.steps, None, jobs[i].query_x)])
        np.testing.assert_allclose(results[i].logits, alone.logits, **TOL)
