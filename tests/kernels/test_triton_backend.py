"""The `triton` engine backend against the `reference` backend: whole K-step adaptations and predictions.

On the CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes
are small (hidden 16) but the images are real Omniglot characters. Tolerance: fast weights, support losses and
query logits within rtol 1e-4 / atol 1e-4 (float32 both sides, only the summation order differs; seen ~1e-5).
GPU tests (marked gpu) run the full-size models, 1024-task batches and the CUDA-graph path.
"""

import io
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kernels.checks.oracles import adapt_error_ratio
from kernels.engine import Engine, resolve_backend
from kernels.engine.fused import TritonBackend, task_bucket
from kernels.fused.program import workspace_bytes_per_task
from models.checkpoint import MetaModel, load_checkpoint
from models.functional import init_params, support_stats
from models.maml import adapt as reference_adapt
from models.maml import predict as reference_predict
from models.preprocess import preprocess_uint8
from models.spec import ModelSpec

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = Path(__file__).resolve().parents[2]
RTOL = ATOL = 1e-4
# Long GPU runs: at most 20x the float32 reference's own distance to float64. The kernels' gradients carry ~1.5-2x
# torch's rounding (another summation order), which 10 steps of lr 0.4 compound: 1.2-4.6x seen on the CPU; a wrong
# gradient gives 1e3x and more.
GPU_RATIO = 20.0


def _omniglot_tasks(root, tasks, ways, shots, queries, side=28, split="images_background"):
    """[T, N*K, 1, side, side] support / [T, N*Q, ...] query uint8 images and labels from distinct characters."""
    with zipfile.ZipFile(root / f"{split}.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        by_char: dict[str, list[str]] = {}
        for n in names:
            by_char.setdefault(n.rsplit("/", 1)[0], []).append(n)
        chars = sorted(by_char)[:: max(1, len(by_char) // (tasks * ways))][: tasks * ways]

        def load(name):
            img = Image.open(io.BytesIO(zf.read(name))).convert("L").resize((side, side), Image.LANCZOS)
            return np.asarray(img, dtype=np.uint8)

        sx, qx = [], []
        for t in range(tasks):
            task_chars = chars[t * ways: (t + 1) * ways]
            sx.append([load(by_char[c][i]) for i in range(shots) for c in task_chars])
            qx.append([load(by_char[c][shots + i]) for i in range(queries) for c in task_chars])
    to = lambda a: torch.from_numpy(np.stack(a)).unsqueeze(2)  # noqa: E731
    sy = torch.arange(ways).repeat(shots).expand(tasks, -1).contiguous()
    return to(sx), sy, to(qx)


def _model(spec, seed=0, meta_sgd=False):
    """A meta-initialization with every parameter perturbed, so zero biases cannot hide a bias bug."""
    g = torch.Generator().manual_seed(seed)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in init_params(spec, g).items()}
    lrs = {k: 0.2 + 0.4 * torch.rand(v.shape, generator=g) for k, v in params.items()} if meta_sgd else None
    return MetaModel(spec, params, lrs).to(DEV)


def _assert_params_close(got, want, what):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, f"{what}: {k} has shape {list(got[k].shape)}"
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.fixture(scope="module")
def omniglot_5w1s(omniglot_root):
    sx, sy, qx = _omniglot_tasks(omniglot_root, tasks=2, ways=5, shots=1, queries=1)
    spec = ModelSpec("omniglot-5w1s-h16", "conv4-omniglot", ways=5, inner_lr=0.4, steps=2, hidden=16)
    return spec, preprocess_uint8(spec, sx).to(DEV), sy.to(DEV), preprocess_uint8(spec, qx).to(DEV)


def test_adapt_and_predict_match_reference_on_real_omniglot(omniglot_5w1s):
    """T=2 tasks 5-way 1-shot, 2 steps, one query per class, 'support' BN policy, through the fused path."""
    spec, sx, sy, qx = omniglot_5w1s
    model = _model(spec)
    got, logits = TritonBackend(DEV).adapt_predict(model, sx, sy, qx, 2, spec.inner_lr, track=True)
    want = reference_adapt(spec, model.params, sx, sy, 2, spec.inner_lr, track=True)
    _assert_params_close(got.params, want.params, "fast weights")
    torch.testing.assert_close(got.support_loss, want.support_loss, rtol=RTOL, atol=ATOL)
    assert torch.equal(got.support_accuracy, want.support_accuracy)
    with torch.no_grad():
        want_logits = reference_predict(spec, want.params, qx, sx, "support")
        want_stats = support_stats(spec, want.params, sx)
    torch.testing.assert_close(logits, want_logits, rtol=RTOL, atol=ATOL)
    _assert_params_close(got.stats, want_stats, "support statistics of the adapted weights")
    assert want.support_loss[-1].mean() < want.support_loss[0].mean(), "the adaptation should lower the loss"


def test_trained_zoo_model_on_held_out_characters(omniglot_root):
    """The 20-way MAML model (hidden 64, trained weights and BN parameters; bundled until the ANIL model replaced it)
    on a task of evaluation-split characters, 2 steps (interpreter time): the fused path gives the reference's
    weights, losses and logits."""
    zoo = ROOT / "docs" / "results" / "omniglot-20w1s-background" / "maml.pt"
    model = load_checkpoint(zoo, expect_arch="conv4-omniglot", device=DEV)
    spec = model.spec
    sx, sy, qx = _omniglot_tasks(omniglot_root, 1, spec.ways, 1, 1, split="images_evaluation")
    sx, sy, qx = preprocess_uint8(spec, sx).to(DEV), sy.to(DEV), preprocess_uint8(spec, qx).to(DEV)
    got, logits = Engine("triton", device=DEV).adapt_predict(model, sx, sy, qx, steps=2, track=True)
    want = reference_adapt(spec, model.params, sx, sy, 2, model.inner_lr(), track=True)
    _assert_params_close(got.params, want.params, "fast weights of the trained model")
    torch.testing.assert_close(got.support_loss, want.support_loss, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        want_logits = reference_predict(spec, want.params, qx, sx, spec.bn_policy)
    torch.testing.assert_close(logits, want_logits, rtol=RTOL, atol=ATOL)


def test_engine_triton_predict_transductive_on_real_omniglot(omniglot_5w1s):
    """Engine('triton').adapt then .predict (separate calls) with the transductive BN policy and Meta-SGD rates."""
    spec, sx, sy, qx = omniglot_5w1s
    model = _model(spec, seed=1, meta_sgd=True)
    engine = Engine("triton", device=DEV)
    assert engine.backend_name == "triton" and isinstance(engine.backend, TritonBackend)
    got = engine.adapt(model, sx, sy, steps=1, track=False)
    want = reference_adapt(spec, model.params, sx, sy, 1, model.inner_lrs)
    assert got.support_loss is None
    _assert_params_close(got.params, want.params, "Meta-SGD fast weights")
    with torch.no_grad():
        want_logits = reference_predict(spec, want.params, qx, None, "transductive")
    torch.testing.assert_close(engine.predict(model, got.params, qx, bn_policy="transductive"), want_logits,
                               rtol=RTOL, atol=ATOL)


def test_miniimagenet_odd_sizes_match_reference():
    """conv4-miniimagenet (stride 1, 2x2 max-pools) on 21x21 inputs: odd sizes leave pool rows uncovered."""
    spec = ModelSpec("mini-tiny", "conv4-miniimagenet", ways=3, inner_lr=0.3, steps=1, hidden=16,
                     input_shape=(3, 21, 21), bn_policy="transductive")
    model = _model(spec, seed=2)
    g = torch.Generator().manual_seed(3)
    sx = torch.rand(2, 3, 3, 21, 21, generator=g).to(DEV)
    sy = torch.tensor([[0, 1, 2], [2, 0, 1]], device=DEV)
    qx = torch.rand(2, 2, 3, 21, 21, generator=g).to(DEV)
    got, logits = TritonBackend(DEV).adapt_predict(model, sx, sy, qx, 1, spec.inner_lr, track=True)
    assert got.stats is None  # transductive: predict needs no support statistics
    want = reference_adapt(spec, model.params, sx, sy, 1, spec.inner_lr, track=True)
    _assert_params_close(got.params, want.params, "fast weights")
    torch.testing.assert_close(got.support_loss, want.support_loss, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference_predict(spec, want.params, qx, None, "transductive"),
                                   rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def tiny():
    """A 9x9 Omniglot-style model: cheap enough under the interpreter for behaviour tests."""
    spec = ModelSpec("tiny", "conv4-omniglot", ways=3, inner_lr=0.4, steps=2, hidden=16, input_shape=(1, 9, 9))
    g = torch.Generator().manual_seed(4)
    sx = torch.rand(3, 6, 1, 9, 9, generator=g).to(DEV)
    sy = torch.randint(0, 3, (3, 6), generator=g).to(DEV)
    qx = torch.rand(3, 4, 1, 9, 9, generator=g).to(DEV)
    return _model(spec, seed=5), sx, sy, qx


def test_task_chunks_give_the_same_result(tiny):
    """A workspace budget for two tasks cuts 3 tasks into chunks of 2 + 1 (adapt and predict): same results."""
    model, sx, sy, qx = tiny
    per_task = workspace_bytes_per_task(model.spec, sx.shape[1], qx.shape[1], 1, model.spec.bn_policy)
    whole, whole_logits = TritonBackend(DEV).adapt_predict(model, sx, sy, qx, 1, 0.4, track=True)
    chunked, chunked_logits = TritonBackend(DEV, workspace_bytes=2 * per_task).adapt_predict(
        model, sx, sy, qx, 1, 0.4, track=True)
    _assert_params_close(chunked.params, whole.params, "chunked fast weights")
    _assert_params_close(chunked.stats, whole.stats, "chunked support statistics")
    torch.testing.assert_close(chunked.support_loss, whole.support_loss)
    torch.testing.assert_close(chunked_logits, whole_logits)
    per_predict = workspace_bytes_per_task(model.spec, 0, qx.shape[1], 0, "transductive")
    chunked_predict = TritonBackend(DEV, workspace_bytes=2 * per_predict).predict(model, whole.params, qx,
                                                                                 whole.stats)
    torch.testing.assert_close(chunked_predict, whole_logits, rtol=RTOL, atol=ATOL)


def test_out_of_memory_during_capture_is_not_a_capture_failure(tiny, monkeypatch):
    """The caller (server.runner) splits a batch the device cannot hold; the key must stay capturable."""
    def no_memory(self, program):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(TritonBackend, "_record", no_memory)
    model, sx, sy, qx = tiny
    backend = TritonBackend(DEV)
    backend.use_graphs = True
    with pytest.raises(torch.OutOfMemoryError), backend.warming():  # warming: the first call captures
        backend.adapt_predict(model, sx, sy, qx, 1, 0.4, track=True)
    assert not backend.capture_failures() and len(backend.graphs) == 0


class _Relaunch:
    """Stands in for a CUDA graph on the CPU: replay() re-runs every launch on the program's static buffers."""

    def __init__(self, program):
        self.program = program

    def replay(self):
        with torch.no_grad():
            self.program.launch()


def test_replay_path_pads_to_buckets_and_returns_copies(tiny, monkeypatch):
    """The graph path's bookkeeping without a GPU: inputs copied into static buffers padded to the task bucket,
    one captured program per bucket, results equal to the reference and never views of the static buffers."""
    monkeypatch.setattr(TritonBackend, "_record", lambda self, program: _Relaunch(program))
    model, sx, sy, qx = tiny
    backend = TritonBackend(DEV)
    backend.use_graphs = True
    five = [torch.cat([t, t[:2].flip(0)]) for t in (sx, sy, qx)]
    results = []
    with backend.warming():  # every key captures on its first call
        for x, y, q in ((sx[:2], sy[:2], qx[:2]), (sx[1:], sy[1:], qx[1:]), five):  # buckets 2, 2 again, 6 (padded)
            n = x.shape[0]
            got, logits = backend.adapt_predict(model, x, y, q, 1, model.spec.inner_lr, track=True)
            want = reference_adapt(model.spec, model.params, x, y, 1, model.spec.inner_lr, track=True)
            _assert_params_close(got.params, want.params, f"replayed fast weights (T={n})")
            torch.testing.assert_close(got.support_loss, want.support_loss, rtol=RTOL, atol=ATOL)
            with torch.no_grad():
                want_logits = reference_predict(model.spec, want.params, q, x, model.spec.bn_policy)
                _assert_params_close(got.stats, support_stats(model.spec, want.params, x), "replayed statistics")
            torch.testing.assert_close(logits, want_logits, rtol=RTOL, atol=ATOL)
            results.append((got, logits, got.support_loss.clone(), logits.clone()))
    assert sorted(key[3] for key in backend.graphs.keys()) == [2, 6]  # one captured program per task bucket
    assert all(backend.graphs.pinned(key) for key in backend.graphs.keys())
    for got, logits, loss, logits_copy in results:
        assert torch.equal(got.support_loss, loss) and torch.equal(logits, logits_copy)


@pytest.fixture(scope="module")
def micro():
    """`tiny` with 2 tasks, 3-way 2-shot, 5 queries and one step: the tests that make many calls (the interpreter
    pays per program, so per task; 6 support rows keep the batch statistics well conditioned)."""
    spec = ModelSpec("micro", "conv4-omniglot", ways=3, inner_lr=0.4, steps=1, hidden=16, input_shape=(1, 9, 9))
    g = torch.Generator().manual_seed(8)
    sx = torch.rand(2, 6, 1, 9, 9, generator=g).to(DEV)
    sy = torch.tensor([[0, 1, 2, 2, 1, 0], [1, 0, 2, 0, 2, 1]], device=DEV)
    qx = torch.rand(2, 5, 1, 9, 9, generator=g).to(DEV)
    return _model(spec, seed=9), sx, sy, qx


class _Counted:
    """A graph stand-in that records each replay's learning rate (read from the program's device scalar) instead of
    running the kernels: for sweeps too long to run under the interpreter."""

    def __init__(self, program, seen):
        self.program, self.seen = program, seen

    def replay(self):
        self.seen.append(float(self.program.lr))


def test_a_key_seen_once_runs_eagerly_and_is_captured_when_it_recurs(micro, monkeypatch):
    recorded = []
    monkeypatch.setattr(TritonBackend, "_record", lambda self, program: recorded.append(program) or _Relaunch(program))
    model, sx, sy, qx = micro
    backend = TritonBackend(DEV)
    backend.use_graphs = True
    want = reference_adapt(model.spec, model.params, sx[:1], sy[:1], 1, 0.4)
    with torch.no_grad():
        want_logits = reference_predict(model.spec, want.params, qx[:1], sx[:1])
    for call in range(3):
        got, logits = backend.adapt_predict(model, sx[:1], sy[:1], qx[:1], 1, 0.4, track=False)
        torch.testing.assert_close(logits, want_logits, rtol=RTOL, atol=ATOL)
        assert len(recorded) == [0, 1, 1][call] and len(backend.graphs) == [0, 1, 1][call], f"call {call + 1}"
    assert backend.graphs.captures == 1 and not backend.graphs.pinned(backend.graphs.keys()[0])


def test_padded_queries_give_the_logits_of_the_unpadded_call(micro, monkeypatch):
    """Under the `support` policy query rows are independent: 5 queries run in a 6-row program (padding rows
    hold stale data) and give the logits of the eager 5-row call and of the reference."""
    monkeypatch.setattr(TritonBackend, "_record", lambda self, program: _Relaunch(program))
    model, sx, sy, qx = micro
    backend = TritonBackend(DEV)
    backend.use_graphs = True
    eager, eager_logits = backend.adapt_predict(model, sx, sy, qx, 1, 0.4, track=True)  # first sighting: eager
    replayed, logits = backend.adapt_predict(model, sx, sy, qx, 1, 0.4, track=True)  # captured, padded
    (key,) = backend.graphs.keys()
    assert key[5] == 6 and backend.graphs.entries()[0].program.query_x.shape[1] == 6
    want = reference_adapt(model.spec, model.params, sx, sy, 1, 0.4, track=True)
    with torch.no_grad():
        want_logits = reference_predict(model.spec, want.params, qx, sx)
    assert logits.shape == eager_logits.shape == (2, 5, 3)
    torch.testing.assert_close(logits, eager_logits, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(logits, want_logits, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(replayed.support_loss, want.support_loss, rtol=RTOL, atol=ATOL)
    _assert_params_close(replayed.stats, eager.stats, "statistics of the padded program")


def test_an_lr_sweep_reuses_the_warmed_programs(micro, monkeypatch):
    """R2: the lr is a value in a device scalar, not part of the key. 50 lr values after the warm-up capture
    nothing and evict nothing: the same program objects serve them all, each replay reads its call's lr. Then three
    of them replayed for real (the kernels run): each equals the reference at that lr."""
    seen: list[float] = []
    monkeypatch.setattr(TritonBackend, "_record", lambda self, program: _Counted(program, seen))
    model, sx, sy, qx = micro
    backend = TritonBackend(DEV, max_graphs=2)
    backend.use_graphs = True
    with backend.warming():
        backend.adapt_predict(model, sx, sy, qx, 1, 0.4, track=False)  # one program for 2 tasks
        backend.adapt_predict(model, sx[:1], sy[:1], qx[:1], 1, 0.4, track=False)  # and one for 1 task
    warmed = dict(backend.graphs.items())
    captures = backend.graphs.captures
    sweep = [0.01 * (i + 1) for i in range(50)]
    for lr in sweep:
        backend.adapt_predict(model, sx, sy, qx, 1, lr, track=False)
    assert backend.graphs.captures == captures and dict(backend.graphs.items()) == warmed
    assert all(backend.graphs.get(key) is entry for key, entry in warmed.items())
    assert seen[-50:] == pytest.approx(sweep, rel=1e-6)
    for entry in warmed.values():
        entry.graph = _Relaunch(entry.program)
    for lr in (sweep[0], sweep[24], sweep[49]):
        got, logits = backend.adapt_predict(model, sx, sy, qx, 1, lr, track=False)
        want = reference_adapt(model.spec, model.params, sx, sy, 1, lr)
        _assert_params_close(got.params, want.params, f"fast weights at lr {lr}")
        with torch.no_grad():
            torch.testing.assert_close(logits, reference_predict(model.spec, want.params, qx, sx), rtol=RTOL,
                                       atol=ATOL)
    assert backend.graphs.captures == captures and dict(backend.graphs.items()) == warmed


def test_recurring_cold_keys_never_evict_warmed_programs(micro, monkeypatch):
    """A full cache of warmed programs: a new key seen twice runs eagerly both times (the room is pinned)."""
    seen: list[float] = []
    monkeypatch.setattr(TritonBackend, "_record", lambda self, program: _Counted(program, seen))
    model, sx, sy, qx = micro
    backend = TritonBackend(DEV, max_graphs=1)
    backend.use_graphs = True
    with backend.warming():
        backend.adapt_predict(model, sx, sy, qx, 1, 0.4, track=False)
    warmed = dict(backend.graphs.items())
    want = reference_adapt(model.spec, model.params, sx[:1], sy[:1], 1, 0.3)
    for _ in range(2):  # 1 task: another key
        got = backend.adapt(model, sx[:1], sy[:1], 1, 0.3, False)
        _assert_params_close(got.params, want.params, "fast weights of the eager call")
    assert dict(backend.graphs.items()) == warmed and backend.graphs.captures == 1


def test_a_key_whose_capture_fails_launches_eagerly(micro, monkeypatch, caplog):
    """The triton backend with graphs on, where capture fails: the request still gets the right answer, and the
    key is not captured again on later calls (first call: eager, second: the failed capture, third: eager)."""
    attempts = []

    def broken(self, program):
        attempts.append(program.tasks)
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(TritonBackend, "_record", broken)
    model, sx, sy, qx = micro
    backend = TritonBackend(DEV)
    backend.use_graphs = True
    whole, whole_logits = TritonBackend(DEV, use_graphs=False).adapt_predict(model, sx, sy, qx, 1, 0.4, track=True)
    with caplog.at_level("WARNING", logger="kernels.engine.fused"):
        for _ in range(3):
            got, logits = backend.adapt_predict(model, sx, sy, qx, 1, 0.4, track=True)
            _assert_params_close(got.params, whole.params, "fast weights after a failed capture")
            torch.testing.assert_close(logits, whole_logits)
    assert attempts == [2] and len(backend.graphs) == 0 and len(backend.capture_failures()) == 1
    assert "this key launches eagerly" in caplog.text


def test_predict_from_stored_statistics_equals_the_reference_with_support_rows(micro):
    """Predict takes the adaptation's statistics (no support rows): the reference's logits with the support rows,
    under both policies; adapt's statistics are those of the adapted weights on the support set."""
    model, sx, sy, qx = micro
    backend = TritonBackend(DEV)
    got = backend.adapt(model, sx, sy, 1, 0.4, track=False)
    want = reference_adapt(model.spec, model.params, sx, sy, 1, 0.4)
    with torch.no_grad():
        _assert_params_close(got.stats, support_stats(model.spec, want.params, sx), "adapt's statistics")
        for policy in ("support", "transductive"):
            torch.testing.assert_close(backend.predict(model, got.params, qx, got.stats, policy),
                                       reference_predict(model.spec, want.params, qx, sx, policy), rtol=RTOL,
                                       atol=ATOL, msg=lambda m, p=policy: f"{p}: {m}")
    with pytest.raises(ValueError, match="predict needs the adaptation's support statistics"):
        backend.predict(model, got.params, qx)


def test_max_rows_is_the_grid_limit_of_the_launchers():
    """The most rows a task may forward: within CUDA's 65535 blocks at that size, past it one row more. On the CPU
    the interpreter's tiles (256 rows) are used; mini-ImageNet's first layer (84x84 outputs) binds."""
    from kernels.fused.program import _rows_fit, conv4_geometry

    backend = TritonBackend(DEV)
    spec = ModelSpec("mini", "conv4-miniimagenet", ways=5, inner_lr=0.01, steps=1)
    limit = backend.max_rows(spec)
    geo = conv4_geometry(spec)
    assert _rows_fit(spec, geo, limit, DEV) and not _rows_fit(spec, geo, limit + 1, DEV)
    if DEV.type == "cpu":
        assert limit == 65535 * 256 // (84 * 84)
    assert backend.max_rows(ModelSpec("sine", "mlp-sinusoid", ways=1, inner_lr=0.01, steps=1)) is None


def test_engine_resolves_the_lr_and_backends_take_it_as_given(tiny):
    """lr=None: Engine applies MetaModel.inner_lr (here the Meta-SGD rates); a backend takes the rates as given."""
    model, sx, sy, qx = tiny
    model = MetaModel(model.spec, model.params, {k: torch.full_like(v, 0.3) for k, v in model.params.items()})
    by_default, _ = Engine("triton", device=DEV).adapt_predict(model, sx[:1], sy[:1], qx[:1], steps=1, lr=None)
    explicit, _ = TritonBackend(DEV).adapt_predict(model, sx[:1], sy[:1], qx[:1], 1, model.inner_lrs)
    want = reference_adapt(model.spec, model.params, sx[:1], sy[:1], 1, model.inner_lrs)
    _assert_params_close(by_default.params, want.params, "Meta-SGD (lr=None)")
    _assert_params_close(explicit.params, want.params, "Meta-SGD (rates passed)")
    with pytest.raises(ValueError, match="lr=None, expected a finite float"):
        TritonBackend(DEV).adapt(model, sx[:1], sy[:1], 1, None, False)


def test_zero_steps_returns_the_initialization_per_task(tiny):
    model, sx, sy, _ = tiny
    got = TritonBackend(DEV).adapt(model, sx, sy, steps=0, lr=0.4, track=True)
    want = reference_adapt(model.spec, model.params, sx, sy, 0, 0.4, track=True)
    _assert_params_close(got.params, want.params, "0-step weights")
    torch.testing.assert_close(got.support_loss, want.support_loss, rtol=RTOL, atol=ATOL)


def test_mlp_falls_back_to_reference_with_a_note(caplog):
    spec = ModelSpec("sine", "mlp-sinusoid", ways=1, inner_lr=0.01, steps=2)
    model = _model(spec, seed=6)
    x = torch.rand(2, 5, 1, device=DEV)
    y = torch.rand(2, 5, 1, device=DEV)
    with caplog.at_level(logging.WARNING, logger="kernels.engine.fused"):
        got = TritonBackend(DEV).adapt(model, x, y, steps=2, lr=0.01, track=True)
    assert "reference path" in caplog.text and "mlp-sinusoid" in caplog.text
    want = reference_adapt(spec, model.params, x, y, 2, 0.01, track=True)
    _assert_params_close(got.params, want.params, "MLP fast weights")


@pytest.mark.parametrize("mutate,error,words", [
    (lambda a: a.update(support_x=a["support_x"].double()), TypeError, ["support_x", "float32"]),
    (lambda a: a.update(support_x=a["support_x"][:, :, :, :8]), ValueError, ["support_x", "[*, *, 1, 9, 9]"]),
    (lambda a: a.update(support_y=a["support_y"] + 3), ValueError, ["labels", "0..2"]),
    (lambda a: a.update(support_y=a["support_y"].int()), TypeError, ["support_y", "torch.int64"]),
    (lambda a: a.update(support_y=a["support_y"][:2]), ValueError, ["support_y", "[3, 6]"]),
    (lambda a: a.update(query_x=a["query_x"][:2]), ValueError, ["query_x", "[3, *, 1, 9, 9]"]),
    (lambda a: a.update(steps=-1), ValueError, ["steps=-1"]),
    (lambda a: a.update(lr=float("nan")), ValueError, ["lr=nan"]),
])
def test_backend_rejects_bad_input(tiny, mutate, error, words):
    model, sx, sy, qx = tiny
    args = dict(support_x=sx, support_y=sy, query_x=qx, steps=1, lr=0.1)
    mutate(args)
    with pytest.raises(error) as info:
        TritonBackend(DEV).adapt_predict(model, args["support_x"], args["support_y"], args["query_x"],
                                         steps=args["steps"], lr=args["lr"])
    for word in words:
        assert word in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA 'triton' is always allowed")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        TritonBackend("cpu")


def test_task_buckets_hold_the_batch_and_waste_at_most_a_third():
    buckets = [task_bucket(n) for n in range(1, 3000)]
    assert all(b >= n for n, b in zip(range(1, 3000), buckets))
    assert all(b <= max(2, 1.5 * n) for n, b in zip(range(1, 3000), buckets))
    assert sorted(buckets) == buckets and task_bucket(1024) == 1024


# ------------------------------------------------------------------------------------------------- GPU (CUDA)


def _random_tasks(spec, tasks, shots, queries, seed):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, spec.ways * shots, *spec.input_shape, generator=g)
    sy = torch.arange(spec.ways).repeat(shots).expand(tasks, -1).contiguous()
    qx = torch.rand(tasks, queries, *spec.input_shape, generator=g)
    return sx.to(DEV), sy.to(DEV), qx.to(DEV)


def _check_subset(spec, model, got, logits, sx, sy, qx, steps, tasks_to_check):
    """Against float64 truth on a few tasks (grouped conv cannot take 1024 tasks of 20-way at once: 32-bit
    indexing), in units of the float32 reference's own error: 10 steps amplify rounding, see adapt_error_ratio."""
    idx = torch.tensor(tasks_to_check, device=DEV)
    ratios = adapt_error_ratio(spec, model.params, sx[idx], sy[idx], qx[idx], steps, spec.inner_lr, spec.bn_policy,
                               {k: v[idx] for k, v in got.params.items()}, logits[idx])
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= GPU_RATIO, f"{worst} is {ratios[worst]:.1f}x as far from float64 as torch's float32"
    assert torch.isfinite(logits).all()


@pytest.mark.gpu
def test_gpu_graph_replays_match_reference_full_size():
    """omniglot 5-way 1-shot, hidden 64, 10 steps, 75 queries; T=5 pads to the 6-task bucket; three replays of the
    same graph with different inputs all match (the static buffers really are refilled) and none of the returned
    tensors changes when the graph runs again (outputs are copies, not views of the graph's buffers)."""
    spec = ModelSpec("omniglot-5w1s", "conv4-omniglot", ways=5, inner_lr=0.4, steps=10)
    model = _model(spec, seed=7)
    backend = TritonBackend(DEV)
    returned = []
    with backend.warming():  # the first call captures
        for tasks, seed in ((5, 8), (5, 9), (6, 10)):  # 6 = the bucket itself: results must still not alias it
            sx, sy, qx = _random_tasks(spec, tasks, 1, 75, seed)
            got, logits = backend.adapt_predict(model, sx, sy, qx, 10, spec.inner_lr, track=True)
            _check_subset(spec, model, got, logits, sx, sy, qx, 10, list(range(tasks)))
            returned.append((got, logits, got.support_loss.clone(), logits.clone(),
                             got.params["conv1.weight"].clone()))
    assert len(backend.graphs) == 1 and backend.graphs.captures == 1
    for got, logits, loss, logits_copy, weight in returned:  # later replays left earlier results alone
        assert torch.equal(got.support_loss, loss) and torch.equal(logits, logits_copy)
        assert torch.equal(got.params["conv1.weight"], weight)


@pytest.mark.gpu
def test_gpu_1024_tasks_omniglot_20way_1shot():
    spec = ModelSpec("omniglot-20w1s", "conv4-omniglot", ways=20, inner_lr=0.1, steps=5)
    model = _model(spec, seed=10)
    sx, sy, qx = _random_tasks(spec, 1024, 1, 20, 11)
    got, logits = TritonBackend(DEV).adapt_predict(model, sx, sy, qx, 5, spec.inner_lr, track=True)
    _check_subset(spec, model, got, logits, sx, sy, qx, 5, [0, 1, 511, 1023])


@pytest.mark.gpu
def test_gpu_1024_tasks_miniimagenet_5way_1shot_75_queries():
    spec = ModelSpec("mini-5w1s", "conv4-miniimagenet", ways=5, inner_lr=0.01, steps=5)
    model = _model(spec, seed=12)
    sx, sy, qx = _random_tasks(spec, 1024, 1, 75, 13)
    got, logits = TritonBackend(DEV).adapt_predict(model, sx, sy, qx, 5, spec.inner_lr, track=True)
    _check_subset(spec, model, got, logits, sx, sy, qx, 5, [0, 700, 1023])


@pytest.mark.gpu
def test_gpu_tensor_core_precisions():
    """tf32x3 keeps float32 accuracy over 10 steps; plain tf32 (10-bit operands) moves one step's logits by
    ~1e-3 relative: bounded here at 1e-2 of the logits' scale."""
    spec = ModelSpec("omniglot-5w1s", "conv4-omniglot", ways=5, inner_lr=0.4, steps=10)
    model = _model(spec, seed=14)
    sx, sy, qx = _random_tasks(spec, 8, 1, 75, 15)
    got, logits = TritonBackend(DEV, precision="tf32x3").adapt_predict(model, sx, sy, qx, 10, 0.4, track=True)
    _check_subset(spec, model, got, logits, sx, sy, qx, 10, list(range(8)))
    _, exact = TritonBackend(DEV, precision="ieee").adapt_predict(model, sx, sy, qx, 1, 0.4)
    _, fast = TritonBackend(DEV, precision="tf32").adapt_predict(model, sx, sy, qx, 1, 0.4)
    scale = float(exact.abs().max())
    assert float((fast - exact).abs().max()) <= 1e-2 * scale


def test_engine_precision_reaches_the_triton_backend_and_is_refused_elsewhere(monkeypatch):
    monkeypatch.delenv("FASTADAPT_TRITON_PRECISION", raising=False)
    assert Engine("triton", device=DEV).precision == "ieee"
    engine = Engine("triton", device=DEV, precision="tf32x3")
    assert engine.precision == "tf32x3" and engine.backend.precision == "tf32x3"
    with pytest.raises(ValueError, match=r"precision 'tf32x3' is an option of the triton backend, the backend is "
                                         r"'reference'"):
        Engine("reference", device="cpu", precision="tf32x3")
    with pytest.raises(ValueError, match=r"precision 'fp16' is unknown, expected one of \('ieee', 'tf32x3', 'tf32'\)"):
        Engine("triton", device=DEV, precision="fp16")
    # `auto` on the CPU picks the reference: the same command line that asks a GPU box for tf32x3 still serves here.
    cpu = Engine("auto", device="cpu", precision="tf32x3")
    assert cpu.backend_name == "reference" and cpu.precision is None
