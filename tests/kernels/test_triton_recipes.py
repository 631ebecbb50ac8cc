"""Recipes on the fused path: ANIL (head-only adaptation), MAML++'s frozen batch norm (`no-bn`) and LSLR's learned
per-step rates run in the Triton program (kernels.fused.program) and give the reference's adaptation
(models.maml.adapt with the checkpoint's recipe options), losses, statistics and logits.

Under the interpreter (tests/conftest.py) on 9x9 inputs, hidden 16, as tests/kernels/test_triton_backend.py.
"""

import logging

import pytest
import torch

from kernels.engine import Engine
from kernels.engine.fused import TritonBackend
from kernels.engine.reference import recipe_options
from models.checkpoint import MetaModel
from models.functional import HEAD_KEYS, support_stats
from models.maml import adapt as reference_adapt
from models.maml import predict as reference_predict
from models.spec import ModelSpec
from tests.kernels.test_triton_backend import ATOL, DEV, RTOL, _assert_params_close, _Counted, _model, _Relaunch


def _tasks(seed=8, tasks=2):
    """3-way 2-shot tasks of 9x9 inputs (6 support rows keep the batch statistics well conditioned), 5 queries."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, 6, 1, 9, 9, generator=g).to(DEV)
    sy = torch.stack([torch.randperm(3, generator=g).repeat(2) for _ in range(tasks)]).to(DEV)
    qx = torch.rand(tasks, 5, 1, 9, 9, generator=g).to(DEV)
    return sx, sy, qx


def _recipe_model(adapt_params="all", step_lrs=None, meta_sgd=False, seed=9, bn_policy="support", head_init="meta"):
    spec = ModelSpec(f"micro-{adapt_params}", "conv4-omniglot", ways=3, inner_lr=0.4, steps=2, hidden=16,
                     input_shape=(1, 9, 9), adapt_params=adapt_params, bn_policy=bn_policy, head_init=head_init)
    base = _model(spec, seed=seed, meta_sgd=meta_sgd)
    rates = None if step_lrs is None else {k: v.to(DEV) for k, v in step_lrs.items()}
    return MetaModel(spec, base.params, base.inner_lrs, {}, rates)


def _reference(model, sx, sy, qx, steps, lr, policy):
    want = reference_adapt(model.spec, model.params, sx, sy, steps, lr, track=True, **recipe_options(model))
    with torch.no_grad():
        logits = reference_predict(model.spec, want.params, qx, sx, policy)
        stats = support_stats(model.spec, want.params, sx)
    return want, logits, stats


def _check(got, logits, want, want_logits, what):
    _assert_params_close(got.params, want.params, f"{what}: fast weights")
    torch.testing.assert_close(got.support_loss, want.support_loss, rtol=RTOL, atol=ATOL)
    assert torch.equal(got.support_accuracy, want.support_accuracy), what
    torch.testing.assert_close(logits, want_logits, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("policy", ["support", "transductive"])
def test_anil_adapts_the_head_alone_on_the_fused_path(policy, caplog):
    """ANIL (head-only), 3 steps: no fallback to the reference; the body of every task's fast weights is the meta
    body, bit for bit; head, support losses, statistics and logits are the reference's."""
    model = _recipe_model("head", bn_policy=policy)
    sx, sy, qx = _tasks()
    backend = TritonBackend(DEV)
    with caplog.at_level(logging.WARNING):
        got, logits = backend.adapt_predict(model, sx, sy, qx, 3, 0.4, track=True, bn_policy=policy)
    assert "using the reference path" not in caplog.text
    want, want_logits, want_stats = _reference(model, sx, sy, qx, 3, 0.4, policy)
    _check(got, logits, want, want_logits, "ANIL")
    for k, v in model.params.items():
        if k not in HEAD_KEYS:
            assert torch.equal(got.params[k], v.expand_as(got.params[k])), f"the body's {k} changed"
    assert not torch.allclose(got.params["head.weight"][0], model.params["head.weight"]), "the head must adapt"
    assert want.support_loss[-1].mean() < want.support_loss[0].mean()
    if model.spec.predict_needs_support_stats():
        _assert_params_close(got.stats, want_stats, "ANIL support statistics (the meta body's)")
        # predict from the stored statistics (no support rows) gives the same logits
        torch.testing.assert_close(backend.predict(model, got.params, qx, got.stats), want_logits, rtol=RTOL,
                                   atol=ATOL)


def test_anil_with_meta_sgd_rates_and_zero_steps():
    """Head-only with per-element rates (the kernels' Meta-SGD mode), then 0 steps (the initialization per task)."""
    model = _recipe_model("head", meta_sgd=True, seed=3)
    sx, sy, qx = _tasks(seed=4)
    got, logits = TritonBackend(DEV).adapt_predict(model, sx, sy, qx, 2, model.inner_lrs, track=True)
    want, want_logits, _ = _reference(model, sx, sy, qx, 2, model.inner_lrs, "support")
    _check(got, logits, want, want_logits, "ANIL + Meta-SGD")
    zero = TritonBackend(DEV).adapt(model, sx, sy, 0, 0.4, track=True)
    want0 = reference_adapt(model.spec, model.params, sx, sy, 0, 0.4, track=True, **recipe_options(model))
    _assert_params_close(zero.params, want0.params, "0-step ANIL")
    torch.testing.assert_close(zero.support_loss, want0.support_loss, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("steps,policy", [(0, "support"), (1, "transductive"), (3, "support")])
def test_proto_anil_starts_the_head_at_the_support_prototypes_on_the_fused_path(steps, policy, caplog):
    """Proto-ANIL (head_init proto): the Triton program's prototype kernel, then the head steps; no fallback. The
    fast weights, losses and logits are the reference's, and after 0 steps the head is 2 mu / -|mu|^2 of the
    support features, i.e. the logits rank the classes as Euclidean nearest-centroid does."""
    model = _recipe_model("head", bn_policy=policy, head_init="proto", seed=11)
    sx, sy, qx = _tasks(seed=12)
    backend = TritonBackend(DEV)
    with caplog.at_level(logging.WARNING):
        got, logits = backend.adapt_predict(model, sx, sy, qx, steps, 0.4, track=True, bn_policy=policy)
    assert "using the reference path" not in caplog.text
    want, want_logits, _ = _reference(model, sx, sy, qx, steps, 0.4, policy)
    _check(got, logits, want, want_logits, f"Proto-ANIL, {steps} steps")
    if steps == 0:  # an independent nearest-centroid classifier on the body's features
        from models.functional import body_features, stack_params

        body = stack_params(model.params, 2)
        feats = body_features(model.spec, body, sx)
        mu = torch.stack([torch.stack([feats[t][sy[t] == c].mean(0) for c in range(3)]) for t in range(2)])
        torch.testing.assert_close(got.params["head.weight"], 2 * mu, rtol=RTOL, atol=ATOL)
        n = sx.shape[1]
        fq = (body_features(model.spec, body, torch.cat([sx, qx], 1), stat_rows=n)[:, n:]
              if policy == "support" else body_features(model.spec, body, qx))
        assert torch.equal(logits.argmax(-1), (-torch.cdist(fq, mu)).argmax(-1))


def test_lslr_per_step_rates_match_the_reference():
    """LSLR: learned rates for some parameters (2 entries, so the 3rd step reuses the last), the spec's lr for
    the rest; the rates differ per parameter and per step."""
    step_lrs = {"conv0.weight": torch.tensor([0.5, 0.1]), "bn1.bias": torch.tensor([0.05, 0.9]),
                "conv3.weight": torch.tensor([0.2, 0.3]), "head.weight": torch.tensor([0.7, 0.02]),
                "head.bias": torch.tensor([0.0, 1.2])}
    model = _recipe_model("all", step_lrs=step_lrs)
    sx, sy, qx = _tasks(seed=5)
    got, logits = Engine("triton", device=DEV).adapt_predict(model, sx, sy, qx, steps=3, track=True)
    want, want_logits, want_stats = _reference(model, sx, sy, qx, 3, model.inner_lr(), "support")
    _check(got, logits, want, want_logits, "LSLR")
    _assert_params_close(got.stats, want_stats, "LSLR support statistics")
    plain = reference_adapt(model.spec, model.params, sx, sy, 3, model.inner_lr())
    assert not torch.allclose(plain.params["head.weight"], want.params["head.weight"]), "the rates must matter"


def test_no_bn_freezes_batch_norm_and_an_override_replaces_the_step_rates():
    """MAML++'s `no-bn` with per-step rates: batch-norm parameters stay the meta-initialization's exactly; a
    client's lr replaces the learned rates (Engine's rule) and still leaves batch norm frozen."""
    model = _recipe_model("no-bn", step_lrs={"conv1.weight": torch.tensor([0.3, 0.6])})
    sx, sy, qx = _tasks(seed=6)
    engine = Engine("triton", device=DEV)
    for lr in (None, 0.25):
        got, logits = engine.adapt_predict(model, sx, sy, qx, steps=2, lr=lr, track=True)
        ref_model = model if lr is None else MetaModel(model.spec, model.params)
        want, want_logits, _ = _reference(ref_model, sx, sy, qx, 2, lr or model.inner_lr(), "support")
        _check(got, logits, want, want_logits, f"no-bn, lr {lr}")
        for k, v in model.params.items():
            if k.startswith("bn"):
                assert torch.equal(got.params[k], v.expand_as(got.params[k])), f"{k} adapted under no-bn"


def test_recipe_programs_are_keyed_by_recipe_and_read_the_lr_at_each_replay(monkeypatch):
    """Captured recipe programs: a `no-bn` model's lr sweep reuses its one program (the per-element rates are
    refilled from the device scalar inside the program, so each replay adapts at its call's lr); an LSLR model of
    the same spec gets a program of its own."""
    seen: list[float] = []
    monkeypatch.setattr(TritonBackend, "_record", lambda self, program: _Counted(program, seen))
    frozen = _recipe_model("no-bn")
    lslr = _recipe_model("no-bn", step_lrs={"head.bias": torch.tensor([0.9])})
    sx, sy, qx = _tasks(seed=7)
    backend = TritonBackend(DEV)
    backend.use_graphs = True
    with backend.warming():
        backend.adapt_predict(frozen, sx, sy, qx, 1, 0.4, track=False)
    (key,) = backend.graphs.keys()
    for lr in (0.1, 0.2, 0.3):
        backend.adapt_predict(frozen, sx, sy, qx, 1, lr, track=False)
    assert backend.graphs.keys() == [key] and seen[-3:] == pytest.approx([0.1, 0.2, 0.3])
    backend.graphs.entries()[0].graph = _Relaunch(backend.graphs.entries()[0].program)
    for lr in (0.1, 0.3):  # replayed for real: the kernels read the refilled rates
        got, logits = backend.adapt_predict(frozen, sx, sy, qx, 1, lr, track=False)
        want, want_logits, _ = _reference(frozen, sx, sy, qx, 1, lr, "support")
        _assert_params_close(got.params, want.params, f"replayed no-bn at lr {lr}")
        torch.testing.assert_close(logits, want_logits, rtol=RTOL, atol=ATOL)
    with backend.warming():
        backend.adapt_predict(lslr, sx, sy, qx, 1, lslr.inner_lr(), track=False)
    assert len(backend.graphs.keys()) == 2 and key in backend.graphs.keys()


@pytest.mark.gpu
def test_gpu_bundled_anil_model_replays_match_the_reference(omniglot_root):
    """The bundled 20-way ANIL model on CUDA graphs (captured under warming, then replayed), 64 tasks of
    evaluation-split characters, 5 steps: the reference's weights and logits."""
    from kernels.engine.fused import TritonBackend as Backend
    from models.checkpoint import load_checkpoint
    from models.preprocess import preprocess_uint8
    from tests.kernels.test_triton_backend import ROOT, _omniglot_tasks

    model = load_checkpoint(ROOT / "models" / "zoo" / "omniglot-20w1s.pt", device="cuda")
    assert model.spec.adapt_params == "head"
    spec = model.spec
    sx, sy, qx = _omniglot_tasks(omniglot_root, 4, spec.ways, 1, 1, split="images_evaluation")
    sx, sy, qx = (preprocess_uint8(spec, sx).cuda().repeat(16, 1, 1, 1, 1), sy.cuda().repeat(16, 1),
                  preprocess_uint8(spec, qx).cuda().repeat(16, 1, 1, 1, 1))
    backend = Backend("cuda")
    with backend.warming():
        backend.adapt_predict(model, sx, sy, qx, 5, model.inner_lr(), track=True)
    got, logits = backend.adapt_predict(model, sx, sy, qx, 5, model.inner_lr(), track=True)
    assert backend.graphs.captures == 1 and not backend.capture_failures()
    want, want_logits, _ = _reference(model, sx, sy, qx, 5, model.inner_lr(), spec.bn_policy)
    _check(got, logits, want, want_logits, "bundled ANIL on CUDA")
