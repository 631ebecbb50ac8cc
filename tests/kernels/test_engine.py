"""The engine's backend interface: every backend implements kernels.engine.protocol.AdaptBackend, checks its inputs
with one helper (one wording), and takes the lr Engine resolved; the graph cache's policy on its own."""

from __future__ import annotations

import pytest
import torch

from kernels.engine import AdaptBackend, Engine, ReferenceBackend
from kernels.engine.fused import TritonBackend
from kernels.engine.graph import GraphBackend
from kernels.engine.graph_cache import GraphCache, query_bucket, task_bucket
from models.checkpoint import MetaModel
from models.functional import init_params, support_stats
from models.maml import adapt, predict
from models.spec import ModelSpec

SPEC = ModelSpec("tiny", "conv4-omniglot", ways=3, inner_lr=0.4, steps=1, hidden=16, input_shape=(1, 9, 9))


def _backends():
    return [ReferenceBackend("cpu"), GraphBackend("cpu", capture=False), TritonBackend("cpu")]


def _inputs(tasks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = MetaModel(SPEC, init_params(SPEC, g))
    sx = torch.rand(tasks, 3, 1, 9, 9, generator=g)
    sy = torch.stack([torch.randperm(3, generator=g) for _ in range(tasks)])
    qx = torch.rand(tasks, 4, 1, 9, 9, generator=g)
    return model, sx, sy, qx


def test_every_backend_implements_the_protocol():
    for backend in _backends():
        assert isinstance(backend, AdaptBackend), backend.name
    assert ReferenceBackend("cpu").max_rows(SPEC) is None and ReferenceBackend("cpu").graph_capacity() is None
    assert TritonBackend("cpu").max_rows(SPEC) > 1000


@pytest.mark.parametrize("mutate,error,text", [
    (lambda a: a.update(qx=a["qx"][:1]), ValueError,
     "query_x has shape [1, 4, 1, 9, 9], expected [2, *, 1, 9, 9] for model tiny"),
    (lambda a: a.update(sy=a["sy"].int()), TypeError, "support_y has dtype torch.int32, expected torch.int64 for "
                                                      "model tiny"),
    (lambda a: a.update(sy=a["sy"] + 1), ValueError, "support_y holds labels 1..3, expected 0..2 for model tiny"),
    (lambda a: a.update(sx=a["sx"][:, :, 0]), ValueError,
     "support_x has shape [2, 3, 9, 9], expected [*, *, 1, 9, 9] for model tiny"),
    (lambda a: a.update(steps=-1), ValueError, "steps=-1, expected >= 0 inner steps (an int)"),
    (lambda a: a.update(lr=None), ValueError, "lr=None, expected a finite float, a 0-dim tensor or Meta-SGD rates"),
    (lambda a: a.update(lr={"head.bias": torch.ones(3)}), ValueError,
     "Meta-SGD rates for model tiny lack 'conv0.weight'"),
])
def test_the_same_bad_input_gets_the_same_message_from_every_backend(mutate, error, text):
    model, sx, sy, qx = _inputs()
    args = dict(sx=sx, sy=sy, qx=qx, steps=1, lr=0.4)
    mutate(args)
    for backend in _backends():
        with pytest.raises(error) as info:
            backend.adapt_predict(model, args["sx"], args["sy"], args["qx"], args["steps"], args["lr"])
        assert text in str(info.value), f"{backend.name}: {info.value}"


def test_predict_without_statistics_is_refused_with_one_message():
    model, sx, sy, qx = _inputs()
    fast = adapt(SPEC, model.params, sx, sy, 1, 0.4).params
    for backend in _backends():
        with pytest.raises(ValueError, match="bn_policy 'support': predict needs the adaptation's support statistics"):
            backend.predict(model, fast, qx)
        with pytest.raises(ValueError, match=r"stats\['bn2.var'\] has shape \[2, 3\], expected \[2, 16\]"):
            stats = support_stats(SPEC, fast, sx)
            backend.predict(model, fast, qx, {**stats, "bn2.var": stats["bn2.var"][:, :3]})


def test_engine_resolves_defaults_and_the_reference_predicts_from_statistics():
    model, sx, sy, qx = _inputs()
    engine = Engine("reference", "cpu")
    res, logits = engine.adapt_predict(model, sx, sy, qx)  # steps and lr: the model's (MetaModel.inner_lr)
    want = adapt(SPEC, model.params, sx, sy, SPEC.steps, SPEC.inner_lr, track=True)
    for k, v in support_stats(SPEC, want.params, sx).items():
        torch.testing.assert_close(res.stats[k], v, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(logits, predict(SPEC, want.params, qx, sx))
        torch.testing.assert_close(engine.predict(model, res.params, qx, res.stats), predict(SPEC, want.params, qx, sx))
    assert engine.precision is None and engine.capture_failures() == [] and engine.max_rows(SPEC) is None


def test_task_and_query_buckets():
    assert [task_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 1000)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 1024]
    assert query_bucket(SPEC, 5, "support") == 6 and query_bucket(SPEC, 5, "transductive") == 5
    assert query_bucket(SPEC, 0, "support") == 0


def test_graph_cache_captures_on_recurrence_and_keeps_warmed_entries():
    cache = GraphCache(max_entries=2, max_bytes=100)
    assert not cache.should_capture("a") and cache.should_capture("a")  # 2nd sighting
    assert cache.make_room(10) and cache.insert("a", "A", 10)
    with cache.warming():
        assert cache.should_capture("w") and cache.make_room(10) and cache.insert("w", "W", 10)
    assert cache.pinned("w") and not cache.pinned("a")
    cache.should_capture("b")
    assert cache.should_capture("b") and cache.make_room(10)  # evicts "a" (unpinned, least recently used)
    cache.insert("b", "B", 10)
    assert cache.keys() == ["w", "b"]
    cache.should_capture("c")
    assert cache.should_capture("c") and cache.make_room(10)  # evicts "b", never the pinned "w"
    cache.insert("c", "C", 10)
    assert cache.keys() == ["w", "c"] and cache.get("w") == "W"
    full = GraphCache(max_entries=1, max_bytes=100)
    with full.warming():
        full.should_capture("w")
        full.insert("w", "W", 10)
    assert not full.make_room(10) and full.keys() == ["w"]  # the room is pinned: the caller runs eagerly
    assert GraphCache(1, 1).make_room(10**9)  # an empty cache always takes one entry
    cache.fail("d", "RuntimeError: capture failed")
    assert not cache.should_capture("d") and cache.failures() == ["RuntimeError: capture failed"]


def test_graph_cache_forgets_cold_keys_beyond_its_bound():
    cache = GraphCache(max_entries=4, max_bytes=100, capture_after=2, max_cold_keys=3)
    for key in range(10):  # a sweep of one-off keys: remembered, bounded, never captured
        assert not cache.should_capture(key)
    assert len(cache._seen) == 3 and not cache.should_capture(0) and cache.should_capture(9)
