"""Start-up warm-up: every model runs once per planned task count before the port opens, and changes nothing."""

import numpy as np
import pytest

from kernels.engine import Engine
from server.__main__ import main
from server.client import FastAdaptClient
from server.warmup import WarmupPlan, bucket_sizes, capacity_warning, graph_capacity, make_plan, parse_tasks
from tests.server.conftest import TINY_SPECS, random_task


@pytest.fixture
def engine_calls(monkeypatch):
    """Every Engine.adapt_predict call: (model name, support shape, query shape); the real engine still runs."""
    calls = []
    real = Engine.adapt_predict

    def spy(self, model, support_x, support_y, query_x, *args, **kwargs):
        calls.append((model.name, tuple(support_x.shape), tuple(query_x.shape)))
        return real(self, model, support_x, support_y, query_x, *args, **kwargs)

    monkeypatch.setattr(Engine, "adapt_predict", spy)
    return calls


def test_warmup_runs_every_model_at_every_task_count_before_serving(make_server, engine_calls):
    running = make_server(warmup="3,1", warmup_shots=2, warmup_queries=4)
    names = running.registry.names()
    assert sorted(running.warmup) == sorted(names)
    assert all(sorted(per_model) == [1, 3] for per_model in running.warmup.values())
    expected = sorted(
        (name, (t, TINY_SPECS[name].ways * 2, *TINY_SPECS[name].input_shape),
         (t, TINY_SPECS[name].ways * 4, *TINY_SPECS[name].input_shape))
        for name in names for t in (1, 3)
    )
    assert sorted(engine_calls) == expected  # all of it done by the time start() returned, i.e. before serving
    assert len(running.cache) == 0  # warm-up tasks are not adaptations anyone can fetch


@pytest.fixture
def graph_engines(monkeypatch):
    """Servers built in this test run the `graph` backend's static-buffer path on the CPU (GraphBackend with
    capture=False: the same buckets, static inputs and outputs as under CUDA graphs, recomputed instead of
    replayed): a backend that keeps state between calls, which the stateless reference backend does not."""
    from kernels.engine.graph import GraphBackend

    built = []

    def engine(backend, device, precision=None):
        made = Engine("reference", "cpu")
        made.backend, made.backend_name = GraphBackend("cpu", capture=False), "graph"
        built.append(made.backend)
        return made

    monkeypatch.setattr("server.app.Engine", engine)
    return built


def test_warmup_does_not_change_what_clients_get(make_server, graph_engines):
    """Warm-up fills the very bucket the client's request then uses (same shape: N x 1 support, 5 queries, default
    steps) with other inputs; the client must get exactly what it gets from a server that never warmed up."""
    spec = TINY_SPECS["tiny-5w"]
    support, labels, query = random_task(spec, queries=5, seed=4)
    results = []
    for warmup in ("none", "1,2"):
        running = make_server(warmup=warmup, warmup_queries=1)
        backend = graph_engines[-1]
        assert bool(running.warmup) == (warmup != "none")
        buckets = backend.captures
        assert buckets == 2 * len(running.warmup)  # warm-up left state behind: a bucket per model and task count
        with FastAdaptClient(running.address, timeout=30) as client:
            adapted, prediction = client.adapt_and_predict("tiny-5w", support, labels, query, keep=False)
        if warmup != "none":
            assert backend.captures == buckets, "the request did not reuse the warmed bucket: nothing was tested"
        results.append((np.asarray(adapted.support_loss), prediction.logits))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_auto_plan_covers_the_graph_buckets_on_cuda_and_one_task_on_the_cpu():
    assert bucket_sizes(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert parse_tasks("auto", "triton", "cuda", 256) == tuple(bucket_sizes(64))
    assert parse_tasks("auto", "triton", "cuda", 10) == (1, 2, 3, 4, 6, 8)  # never beyond max_batch
    assert parse_tasks("auto", "graph", "cuda", 256) == (1,)  # exact-count buckets: the operator lists them
    assert parse_tasks("auto", "reference", "cpu", 256) == (1,)
    assert parse_tasks("auto", "reference", "cuda", 256) == (1,)
    assert parse_tasks(" None ", "triton", "cuda", 256) == ()
    assert parse_tasks("8, 1,8", "reference", "cpu", 256) == (1, 8)


@pytest.mark.parametrize("value,bad", [("0", "'0'"), ("1,x", "'x'"), ("300", "'300'"), ("", "''"), ("all", "'all'")])
def test_bad_warmup_values_are_refused_with_the_value_named(value, bad):
    with pytest.raises(ValueError) as err:
        parse_tasks(value, "reference", "cpu", 256)
    message = str(err.value)
    assert bad in message and "expected 'auto', 'none'" in message and "max_batch=256" in message


@pytest.mark.parametrize("shots,queries,needle", [(0, 15, "--warmup-shots 0"), (1, -1, "--warmup-queries -1")])
def test_bad_warmup_shapes_are_refused(shots, queries, needle):
    with pytest.raises(ValueError, match=needle):
        make_plan("1", shots, queries, "reference", "cpu", 8)


def test_warmup_models_and_steps_select_what_is_warmed(make_server, engine_calls, monkeypatch):
    steps = []
    real = Engine.adapt_predict

    def spy(self, model, support_x, support_y, query_x, *args, **kwargs):
        steps.append(kwargs.get("steps"))
        return real(self, model, support_x, support_y, query_x, *args, **kwargs)

    monkeypatch.setattr(Engine, "adapt_predict", spy)
    running = make_server(warmup="2", warmup_models="tiny-5w-td", warmup_steps=3, warmup_queries=1)
    assert list(running.warmup) == ["tiny-5w-td"] and steps == [3]


@pytest.mark.parametrize("args,needle", [
    (["--warmup", "1,zero"], "'zero' is not a task count"),
    (["--warmup-models", "tiny-5w,omniglot-9w"], "['omniglot-9w'] not served here"),
    (["--warmup-steps", "-2"], "--warmup-steps -2"),
])
def test_cli_exits_2_on_bad_warmup_arguments(tiny_model_dir, capsys, args, needle):
    code = main(["--model-dir", str(tiny_model_dir), "--port", "0", "--device", "cpu", *args])
    assert code == 2
    captured = capsys.readouterr()
    assert needle in captured.out + captured.err


def test_a_warmup_larger_than_the_graph_cache_is_flagged():
    from kernels.engine.fused import TritonBackend
    from kernels.engine.graph import GraphBackend

    plan = WarmupPlan(tuple(bucket_sizes(64)))  # 12 task counts
    assert capacity_warning(plan, 3, 64) is None and capacity_warning(plan, 3, None) is None
    message = capacity_warning(plan, 3, 16)
    assert "36 programs (3 models x 12 task counts)" in message and "keeps 16" in message
    assert graph_capacity(GraphBackend("cpu")) is None  # the CPU captures nothing
    assert graph_capacity(TritonBackend("cpu")) is None  # the interpreter launches, no graphs
    assert graph_capacity(TritonBackend("cpu", use_graphs=False, max_graphs=5)) is None


def test_a_warmup_the_device_cannot_hold_stops_start_up_with_the_reason(tiny_model_dir, monkeypatch, capsys):
    import torch

    def full(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(Engine, "adapt_predict", full)
    code = main(["--model-dir", str(tiny_model_dir), "--port", "0", "--device", "cpu", "--warmup", "2"])
    out = capsys.readouterr()
    assert code == 2
    assert "ran out of memory for one task" in out.out + out.err and "--warmup none" in out.out + out.err
