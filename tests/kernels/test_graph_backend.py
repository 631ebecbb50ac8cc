"""The `graph` backend: bucketing and static-buffer logic on the CPU, equality with the reference under real CUDA
graphs on the GPU.

On the CPU, `GraphBackend(capture=False)` runs the reference function itself (models.maml) eagerly on its static
buffers instead of replaying a graph, so "equals the reference" there cannot catch a capture bug: what the CPU tests
check is the bucket bookkeeping (which call builds or reuses a bucket), that each call's inputs really are copied
into the static buffers, and that returned results are copies that survive the next call. Capture equality is the
GPU tests' job (`@pytest.mark.gpu` below; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from kernels.engine import Engine
from kernels.engine.graph import GraphBackend, bucket_key
from models.checkpoint import MetaModel
from models.functional import init_params
from models.maml import adapt, predict
from models.spec import ModelSpec

SPEC = ModelSpec("tiny-omniglot", "conv4-omniglot", ways=3, inner_lr=0.4, steps=2, hidden=4)


def make_model(seed=0, spec=SPEC, device="cpu") -> MetaModel:
    return MetaModel(spec, init_params(spec, torch.Generator().manual_seed(seed))).to(device)


def make_tasks(tasks, shots=1, queries=4, seed=0, spec=SPEC, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = spec.ways * shots
    sx = torch.rand(tasks, n, *spec.input_shape, generator=g)
    sy = torch.stack([torch.randperm(n, generator=g) % spec.ways for _ in range(tasks)])
    qx = torch.rand(tasks, queries, *spec.input_shape, generator=g)
    return sx.to(device), sy.to(device), qx.to(device)


def assert_matches_reference(res, logits, model, sx, sy, qx, steps, lr, atol=1e-6):
    """On the CPU: the result was computed from these inputs (not a stale buffer's); on CUDA: capture equality."""
    ref = adapt(model.spec, model.params, sx, sy, steps, lr, track=True)
    for k, v in ref.params.items():
        torch.testing.assert_close(res.params[k], v, atol=atol, rtol=atol, msg=f"fast weight {k}")
    torch.testing.assert_close(res.support_loss, ref.support_loss, atol=atol, rtol=atol)
    torch.testing.assert_close(res.support_accuracy, ref.support_accuracy)
    if logits is not None:
        torch.testing.assert_close(logits, predict(model.spec, ref.params, qx, sx), atol=atol, rtol=atol)


# -- bucketing (CPU) ------------------------------------------------------------------------------------------------
def test_bucket_key_depends_on_shapes_steps_lr_type_not_values():
    base = bucket_key("adapt", SPEC, 4, 3, 0, 2, 0.4, True)
    assert bucket_key("adapt", SPEC, 4, 3, 0, 2, 0.1, True) == base  # another lr value: same graph
    assert bucket_key("adapt", SPEC.with_(name="other", inner_lr=0.9), 4, 3, 0, 2, 0.4, True) == base
    lr_dict = {"head.bias": torch.zeros(3)}
    variants = [
        bucket_key("adapt", SPEC, 5, 3, 0, 2, 0.4, True),
        bucket_key("adapt", SPEC, 4, 6, 0, 2, 0.4, True),
        bucket_key("adapt", SPEC, 4, 3, 0, 3, 0.4, True),
        bucket_key("adapt", SPEC, 4, 3, 0, 2, lr_dict, True),
        bucket_key("adapt", SPEC, 4, 3, 0, 2, 0.4, False),
        bucket_key("adapt", SPEC.with_(hidden=8), 4, 3, 0, 2, 0.4, True),
        bucket_key("adapt_predict", SPEC, 4, 3, 7, 2, 0.4, True, "support"),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_lr_of_another_type_is_refused():
    with pytest.raises(TypeError, match="inner lr is str"):
        bucket_key("adapt", SPEC, 1, 3, 0, 1, "0.4")


def test_static_buffers_are_refilled_per_call_and_results_survive_the_next_call():
    """Buffer aliasing, not capture: the second call reuses the bucket, and the first call's results are not
    overwritten by it (they are copies of the static outputs, not views)."""
    backend, model = GraphBackend("cpu", capture=False, capture_after=1), make_model()
    sx1, sy1, qx1 = make_tasks(2, seed=1)
    sx2, sy2, qx2 = make_tasks(2, seed=2)
    r1, l1 = backend.adapt_predict(model, sx1, sy1, qx1, 2, 0.4)
    r2, l2 = backend.adapt_predict(model, sx2, sy2, qx2, 2, 0.4)
    assert backend.captures == 1  # same bucket, replayed
    assert_matches_reference(r1, l1, model, sx1, sy1, qx1, 2, 0.4)  # not overwritten by the second replay
    assert_matches_reference(r2, l2, model, sx2, sy2, qx2, 2, 0.4)
    r3, l3 = backend.adapt_predict(model, sx1, sy1, qx1, SPEC.steps, model.inner_lr())  # resolved by the caller
    assert_matches_reference(r3, l3, model, sx1, sy1, qx1, SPEC.steps, SPEC.inner_lr)


def test_adapt_and_predict_get_their_own_buckets_per_bn_policy():
    """Bucket keys: adapt and predict under each batch-norm policy are separate buckets, each fed its own inputs."""
    backend, model = GraphBackend("cpu", capture=False, capture_after=1), make_model()
    sx, sy, qx = make_tasks(3, shots=2, queries=5)
    res = backend.adapt(model, sx, sy, 3, 0.4, True)
    assert_matches_reference(res, None, model, sx, sy, qx, 3, 0.4)
    for policy in ("support", "transductive"):
        want = predict(SPEC, res.params, qx, sx, policy)
        torch.testing.assert_close(backend.predict(model, res.params, qx, res.stats, policy), want, atol=1e-6,
                                   rtol=1e-6)
    assert backend.captures == 3  # adapt, predict/support, predict/transductive


def test_new_lr_value_reuses_the_bucket_and_is_applied():
    backend, model = GraphBackend("cpu", capture=False, capture_after=1), make_model()
    sx, sy, qx = make_tasks(2)
    backend.adapt(model, sx, sy, 2, 0.4, True)
    res = backend.adapt(model, sx, sy, 2, 0.05, True)
    assert backend.captures == 1
    assert_matches_reference(res, None, model, sx, sy, qx, 2, 0.05)


def test_meta_sgd_rates_are_their_own_bucket():
    backend, model = GraphBackend("cpu", capture=False, capture_after=1), make_model()
    sx, sy, qx = make_tasks(2)
    g = torch.Generator().manual_seed(3)
    lrs = {k: torch.rand(v.shape, generator=g) * 0.5 for k, v in model.params.items()}
    backend.adapt(model, sx, sy, 2, 0.4, True)
    res = backend.adapt(model, sx, sy, 2, lrs, True)
    assert backend.captures == 2
    assert_matches_reference(res, None, model, sx, sy, qx, 2, lrs)


def test_changed_or_other_meta_parameters_are_copied_in():
    backend, model = GraphBackend("cpu", capture=False, capture_after=1), make_model(seed=0)
    sx, sy, qx = make_tasks(2)
    backend.adapt(model, sx, sy, 2, 0.4, True)
    with torch.no_grad():
        model.params["head.weight"].add_(0.5)  # in place: same tensor object, new version
    assert_matches_reference(backend.adapt(model, sx, sy, 2, 0.4, True), None, model, sx, sy, qx, 2, 0.4)
    other = make_model(seed=1)  # same architecture: same bucket, its own weights
    assert_matches_reference(backend.adapt(other, sx, sy, 2, 0.4, True), None, other, sx, sy, qx, 2, 0.4)
    assert backend.captures == 1


def test_least_recently_used_bucket_is_evicted():
    backend, model = GraphBackend("cpu", capture=False, capture_after=1, max_buckets=2), make_model()
    batches = {t: make_tasks(t) for t in (1, 2, 3)}
    for t in (1, 2, 1, 3):  # T=2 is the least recently used when T=3 arrives
        backend.adapt(model, batches[t][0], batches[t][1], 1, 0.4, False)
    assert sorted(k.tasks for k in backend.buckets) == [1, 3]
    assert backend.captures == 3


def test_bad_inputs_are_refused_with_the_shape_expected():
    backend, model = GraphBackend("cpu", capture=False, capture_after=1), make_model()
    sx, sy, qx = make_tasks(2)
    with pytest.raises(ValueError, match=r"support_x has shape \[2, 3, 28, 28\], expected \[\*, \*, 1, 28, 28\]"):
        backend.adapt(model, sx[:, :, 0], sy, 1, 0.4, False)
    with pytest.raises(TypeError, match="support_y has dtype torch.float32, expected torch.int64"):
        backend.adapt(model, sx, sy.float(), 1, 0.4, False)
    with pytest.raises(ValueError, match=r"query_x has shape \[3, 4, 1, 28, 28\], expected \[2, "):
        backend.adapt_predict(model, sx, sy, torch.cat([qx, qx[:1]]), 1, 0.4)
    with pytest.raises(ValueError, match="steps=-1, expected >= 0"):
        backend.adapt(model, sx, sy, -1, 0.4, False)


def test_parameters_that_require_grad_are_refused():
    backend, model = GraphBackend("cpu", capture=False, capture_after=1), make_model()
    sx, sy, _ = make_tasks(1)
    model.params["head.bias"].requires_grad_(True)
    with pytest.raises(ValueError, match="use backend 'reference'"):
        backend.adapt(model, sx, sy, 1, 0.4, False)


def test_capture_without_cuda_is_refused():
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        GraphBackend("cpu", capture=True)


def test_a_bucket_whose_capture_fails_runs_eagerly_and_stays_correct(caplog):
    """Asking for capture where it cannot work (here: no CUDA at all) must cost speed, not requests."""
    backend, model = GraphBackend("cpu", capture=False, capture_after=1), make_model()
    backend.capture = True  # as on a GPU: every new bucket tries a CUDA graph first
    sx, sy, qx = make_tasks(2, seed=3)
    with caplog.at_level("WARNING", logger="kernels.engine.graph"):
        for _ in range(2):  # the capture fails once; the key then runs eagerly without trying again
            res, logits = backend.adapt_predict(model, sx, sy, qx, 2, 0.4)
            assert_matches_reference(res, logits, model, sx, sy, qx, 2, 0.4)
    assert not backend.buckets and backend.captures == 0 and len(backend.capture_failures()) == 1
    assert "CUDA-graph capture failed, this key runs eagerly" in caplog.text


# -- real CUDA graphs -------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("spec", [SPEC, ModelSpec("mini", "conv4-miniimagenet", ways=5, inner_lr=0.01, steps=3,
                                                  hidden=8)], ids=lambda s: s.arch)
def test_graph_engine_matches_reference_on_cuda(spec):
    model = make_model(spec=spec, device="cuda")
    graph, ref = Engine("graph", "cuda"), Engine("reference", "cuda")
    with graph.warming():  # the first call captures, the second replays
        for seed in (1, 2):
            sx, sy, qx = make_tasks(3, shots=2, queries=5, seed=seed, spec=spec, device="cuda")
            got, want = graph.adapt(model, sx, sy, 3), ref.adapt(model, sx, sy, 3)
            for k in want.params:
                torch.testing.assert_close(got.params[k], want.params[k], atol=1e-5, rtol=1e-5, msg=k)
            for k in want.stats:
                torch.testing.assert_close(got.stats[k], want.stats[k], atol=1e-5, rtol=1e-5, msg=k)
            torch.testing.assert_close(got.support_loss, want.support_loss, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.support_accuracy, want.support_accuracy)
            for policy in ("support", "transductive"):
                torch.testing.assert_close(graph.predict(model, got.params, qx, got.stats, policy),
                                           ref.predict(model, want.params, qx, want.stats, policy), atol=1e-4,
                                           rtol=1e-4)
            _, logits = graph.backend.adapt_predict(model, sx, sy, qx, 3, spec.inner_lr, keep_fast=False)
            torch.testing.assert_close(logits, ref.predict(model, want.params, qx, want.stats), atol=1e-4,
                                       rtol=1e-4)
    assert graph.backend.captures == 4  # adapt, predict x 2 policies, adapt_predict: built once, replayed after
    assert all(b.graph is not None for b in graph.backend.buckets.values())


@pytest.mark.gpu
def test_graph_replay_tracks_new_lr_and_meta_sgd_on_cuda():
    model = make_model(device="cuda")
    backend = Engine("graph", "cuda").backend
    sx, sy, qx = make_tasks(4, seed=5, device="cuda")
    lrs = {k: torch.full_like(v, 0.2) for k, v in model.params.items()}
    with backend.warming():  # every key captures on its first call
        for lr in (0.4, 0.1, lrs):
            got = backend.adapt(model, sx, sy, 2, lr, True)
            want = adapt(SPEC, model.params, sx, sy, 2, lr, track=True)
            for k in want.params:
                torch.testing.assert_close(got.params[k], want.params[k], atol=1e-5, rtol=1e-5, msg=f"{k}, lr {lr}")
    assert backend.captures == 2  # scalar lr (two values) and Meta-SGD rates


@pytest.mark.gpu
def test_after_a_failed_capture_on_cuda_the_eager_fallback_is_right(monkeypatch):
    """A capture that fails on the GPU (a host sync inside it, the failure the H200 showed) leaves the key eager
    and its results equal the reference's: the failed capture does not poison what runs after it."""
    from kernels.engine import graph as graph_backend

    real = graph_backend._Bucket._capture

    def sync_inside(self):
        fn = self.fn
        self.fn = lambda inputs: (torch.zeros(1, device="cuda").item(), fn(inputs))[1]  # illegal while capturing
        try:
            real(self)
        finally:
            self.fn = fn

    monkeypatch.setattr(graph_backend._Bucket, "_capture", sync_inside)
    model = make_model(device="cuda")
    backend = Engine("graph", "cuda").backend
    sx, sy, qx = make_tasks(3, seed=7, device="cuda")
    with backend.warming():  # the first call tries to capture
        res, logits = backend.adapt_predict(model, sx, sy, qx, 2, 0.4)
    assert not backend.buckets and len(backend.capture_failures()) == 1
    with torch.backends.cudnn.flags(allow_tf32=False):
        assert_matches_reference(res, logits, model, sx, sy, qx, 2, 0.4, atol=1e-4)


def test_engine_reports_capture_failures_and_the_bench_refuses_to_time_them(monkeypatch):
    from kernels.bench import CONFIGS
    from kernels.bench.configs import make_case
    from kernels.bench.configs import make_model as bench_model
    from kernels.bench.methods import engine_method

    engine = Engine("reference", "cpu")
    engine.backend = GraphBackend("cpu", capture=False, capture_after=1)
    assert engine.capture_failures() == []
    engine.backend.capture = True  # capture cannot work here: the bucket falls back to eager
    sx, sy, qx = make_tasks(1, seed=4)
    engine.adapt_predict(make_model(), sx, sy, qx, 1, 0.4)
    assert len(engine.capture_failures()) == 1
    config = CONFIGS["tiny"]
    case = make_case(config, bench_model(config, torch.device("cpu")), 1, torch.device("cpu"))
    method = engine_method("graph")

    def forced(backend, device, precision=None):  # the bench's graph engine, on a box where capture fails
        e = Engine("reference", "cpu")
        e.backend = GraphBackend("cpu", capture=False, capture_after=1)
        e.backend.capture = True
        return e

    import kernels.bench.methods as methods

    monkeypatch.setattr(methods, "_engine", forced)
    call = method.make(case)
    with pytest.raises(RuntimeError, match="CUDA-graph capture failed, the backend ran eagerly"):
        call()


def test_buckets_are_also_bounded_in_bytes():
    """Large buckets (a 1,024-task chunk can hold a quarter of a GPU) are evicted by size, least recently used first,
    but the bucket just built always stays."""
    model = make_model()
    probe = GraphBackend("cpu", capture=False, capture_after=1)
    probe.adapt(model, *make_tasks(2)[:2], 1, 0.4, False)
    (two,) = probe.buckets.values()
    assert two.nbytes > 0
    backend = GraphBackend("cpu", capture=False, capture_after=1, cache_bytes=2 * two.nbytes)  # room for ~2 in all
    for t in (2, 1, 3):
        backend.adapt(model, *make_tasks(t)[:2], 1, 0.4, False)
    assert sum(b.nbytes for b in backend.buckets.values()) <= backend.cache_bytes
    assert sorted(k.tasks for k in backend.buckets) == [1, 3]  # T=2 went: least recently used when T=3 came
    tiny = GraphBackend("cpu", capture=False, capture_after=1, cache_bytes=1)
    res = tiny.adapt(model, *make_tasks(2)[:2], 1, 0.4, False)  # nothing fits: it still runs, and keeps one bucket
    tiny.adapt(model, *make_tasks(1)[:2], 1, 0.4, False)
    assert [k.tasks for k in tiny.buckets] == [1] and res.params


# -- capture policy, padding, stored statistics (CPU) ------------------------------------------------------------------
def test_a_key_seen_once_runs_eagerly_and_its_second_call_builds_the_bucket():
    backend, model = GraphBackend("cpu", capture=False), make_model()
    sx, sy, qx = make_tasks(2)
    for call, built in enumerate((0, 1, 1)):
        res, logits = backend.adapt_predict(model, sx, sy, qx, 2, 0.4)
        assert_matches_reference(res, logits, model, sx, sy, qx, 2, 0.4)
        assert backend.captures == built and len(backend.buckets) == built, f"call {call + 1}"


def test_an_lr_sweep_reuses_the_warmed_buckets_and_applies_each_lr():
    """R2: 50 lr values after the warm-up build nothing and evict nothing (the same bucket objects), and each call
    equals the reference at its own lr."""
    backend, model = GraphBackend("cpu", capture=False, max_buckets=2), make_model()
    sx, sy, qx = make_tasks(2)
    with backend.warming():
        backend.adapt_predict(model, sx, sy, qx, 1, 0.4)
        backend.adapt_predict(model, sx[:1], sy[:1], qx[:1], 1, 0.4)
    warmed, captures = backend.buckets, backend.captures
    for i in range(50):
        lr = 0.01 * (i + 1)
        res, logits = backend.adapt_predict(model, sx, sy, qx, 1, lr)
        ref = adapt(SPEC, model.params, sx, sy, 1, lr, track=True)
        torch.testing.assert_close(res.params["conv1.weight"], ref.params["conv1.weight"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(logits, predict(SPEC, ref.params, qx, sx), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, lr=lr: f"lr {lr}: {m}")
    assert backend.captures == captures and backend.buckets.keys() == warmed.keys()
    assert all(backend.buckets[k] is b for k, b in warmed.items())


def test_recurring_new_keys_never_evict_warmed_buckets():
    backend, model = GraphBackend("cpu", capture=False, max_buckets=1), make_model()
    sx, sy, qx = make_tasks(2)
    with backend.warming():
        backend.adapt(model, sx, sy, 1, 0.4, False)
    warmed = backend.buckets
    for _ in range(3):  # another key, recurring: runs eagerly, the pinned bucket stays
        assert_matches_reference(backend.adapt(model, sx, sy, 2, 0.4, True), None, model, sx, sy, qx, 2, 0.4)
    assert backend.buckets == warmed and backend.captures == 1


def test_padded_tasks_and_queries_give_the_unpadded_results():
    """5 tasks x 5 queries run in a 6 x 6 bucket (`support` policy: query rows are independent); transductive
    predicts keep their exact query count (padding rows would enter the batch statistics)."""
    backend, model = GraphBackend("cpu", capture=False, capture_after=1), make_model()
    sx, sy, qx = make_tasks(5, queries=5)
    res, logits = backend.adapt_predict(model, sx, sy, qx, 2, 0.4)
    (key,) = backend.buckets
    assert (key.tasks, key.queries) == (6, 6)
    assert_matches_reference(res, logits, model, sx, sy, qx, 2, 0.4, atol=1e-5)
    ref = adapt(SPEC, model.params, sx, sy, 2, 0.4)
    for policy, queries in (("support", 6), ("transductive", 5)):
        got = backend.predict(model, res.params, qx, res.stats, policy)
        assert got.shape == (5, 5, SPEC.ways)
        torch.testing.assert_close(got, predict(SPEC, ref.params, qx, sx, policy), atol=1e-5, rtol=1e-5)
        assert any(k.op == "predict" and k.bn_policy == policy and k.queries == queries for k in backend.buckets)


def test_predict_from_stored_statistics_equals_the_reference_with_support_rows():
    """adapt's statistics are models.functional.support_stats of the adapted weights; predict with them (no support
    rows) gives the reference's logits computed with the support rows."""
    from models.functional import support_stats

    backend, model = GraphBackend("cpu", capture=False), make_model()
    sx, sy, qx = make_tasks(3, shots=2, queries=5)
    ref = adapt(SPEC, model.params, sx, sy, 2, 0.4)
    want_stats = support_stats(SPEC, ref.params, sx)
    for _ in range(2):  # eager, then through the bucket
        res = backend.adapt(model, sx, sy, 2, 0.4, False)
        for k, v in want_stats.items():
            torch.testing.assert_close(res.stats[k], v, atol=1e-6, rtol=1e-6, msg=k)
        torch.testing.assert_close(backend.predict(model, res.params, qx, res.stats), predict(SPEC, ref.params, qx, sx),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="predict needs the adaptation's support statistics"):
        backend.predict(model, res.params, qx)


# -- recipes ---------------------------------------------------------------------------------------------------------
def recipe_model(adapt_params, step_lrs=None, device="cpu", seed=4):
    spec = SPEC.with_(name=f"tiny-{adapt_params}", adapt_params=adapt_params)
    params = init_params(spec, torch.Generator().manual_seed(seed))
    rates = None if step_lrs is None else {k: v.to(device) for k, v in step_lrs.items()}
    return MetaModel(spec, params, None, {}, rates).to(device)


LSLR_RATES = {"conv1.weight": torch.tensor([0.6, 0.1]), "head.bias": torch.tensor([0.05, 0.9])}


def recipe_reference(model, sx, sy, qx, steps, lr):
    from kernels.engine.reference import recipe_options

    ref = adapt(model.spec, model.params, sx, sy, steps, lr, track=True, **recipe_options(model))
    return ref, predict(model.spec, ref.params, qx, sx)


def test_recipes_are_buckets_of_their_own_and_adapt_as_the_checkpoint_says():
    """ANIL, no-bn and LSLR models of one architecture: each its own bucket (the adapted subset and the rates'
    shapes are part of the key, values are not), each call's rates copied in, each result the recipe's (the
    LSLR rates of a second model with the same shapes reach the replay: they are inputs, not constants)."""
    backend = GraphBackend("cpu", capture=False, capture_after=1)
    sx, sy, qx = make_tasks(2, shots=2, queries=3, seed=9)
    other_rates = {k: v * 2 for k, v in LSLR_RATES.items()}
    models = [recipe_model("head"), recipe_model("no-bn"), recipe_model("all", LSLR_RATES),
              recipe_model("all", other_rates)]
    for model in models:
        res, logits = backend.adapt_predict(model, sx, sy, qx, 3, model.inner_lr())
        want, want_logits = recipe_reference(model, sx, sy, qx, 3, model.inner_lr())
        for k, v in want.params.items():
            torch.testing.assert_close(res.params[k], v, atol=1e-6, rtol=1e-6, msg=f"{model.name} {k}")
        torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(res.support_loss, want.support_loss, atol=1e-6, rtol=1e-6)
    assert backend.captures == 3  # the two LSLR models share one bucket
    head = models[0]
    anil, _ = backend.adapt_predict(head, sx, sy, qx, 3, 0.4)
    for k, v in head.params.items():
        if not k.startswith("head."):
            assert torch.equal(anil.params[k], v.expand_as(anil.params[k])), f"ANIL changed the body's {k}"
    keys = {bucket_key("adapt", m.spec, 2, 6, 0, 3, 0.4, True, step_lrs=m.step_lrs) for m in models}
    assert len(keys) == 3


def test_a_proto_head_model_is_a_bucket_of_its_own_and_starts_at_the_prototypes():
    """Proto-ANIL (head_init proto) beside ANIL with the same tensors: its own bucket (head_init is part of the
    key), and its adaptation is the reference's, whose 0-step head is the support prototypes, not the meta head."""
    backend = GraphBackend("cpu", capture=False, capture_after=1)
    sx, sy, qx = make_tasks(2, shots=2, queries=3, seed=4)
    anil = recipe_model("head")
    proto = MetaModel(anil.spec.with_(head_init="proto"), anil.params, None, {})
    assert bucket_key("adapt", anil.spec, 2, 6, 0, 3, 0.4) != bucket_key("adapt", proto.spec, 2, 6, 0, 3, 0.4)
    for steps in (0, 3):
        for model in (anil, proto):
            res, logits = backend.adapt_predict(model, sx, sy, qx, steps, 0.4)
            want, want_logits = recipe_reference(model, sx, sy, qx, steps, 0.4)
            for k, v in want.params.items():
                torch.testing.assert_close(res.params[k], v, atol=1e-6, rtol=1e-6, msg=f"{model.name} {k}")
            torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=1e-6)
        if steps == 0:
            assert not torch.allclose(res.params["head.weight"], anil.params["head.weight"].expand_as(
                res.params["head.weight"])), "the proto model's head must not be the meta head"
    assert backend.captures == 4


@pytest.mark.gpu
@pytest.mark.parametrize("adapt_params,rates", [("head", None), ("no-bn", None), ("all", LSLR_RATES)])
def test_recipes_captured_on_cuda_match_the_reference(adapt_params, rates):
    model = recipe_model(adapt_params, rates, device="cuda")
    graph, ref = Engine("graph", "cuda"), Engine("reference", "cuda")
    with graph.warming():
        for seed in (1, 2):  # the first call captures, the second replays
            sx, sy, qx = make_tasks(3, shots=2, queries=5, seed=seed, device="cuda")
            got, got_logits = graph.adapt_predict(model, sx, sy, qx, 3)
            want, want_logits = ref.adapt_predict(model, sx, sy, qx, 3)
            for k in want.params:
                torch.testing.assert_close(got.params[k], want.params[k], atol=1e-5, rtol=1e-5, msg=k)
            torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    assert graph.backend.captures == 1 and not graph.capture_failures()
