"""MAML++ per-step batch-norm weights (BNWB, `step_bn`: a meta-learned gamma / beta row per inner step): the inner
loop against a hand-unrolled one, where the meta-gradient goes, the checkpoint field, meta-training on real Omniglot
(resume, init_from), evaluation, the engine's backends, and the config switch."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kernels.engine import Engine
from kernels.engine.fused import TritonBackend
from kernels.engine.graph import GraphBackend
from kernels.engine.reference import ReferenceBackend, needs_reference, recipe_options
from models.checkpoint import CheckpointError, MetaModel, load_checkpoint, save_checkpoint
from models.functional import (
    adapted_keys,
    bn_param_keys,
    forward,
    init_params,
    param_shapes,
    running_at,
    stats_shapes,
)
from models.maml import adapt, adaptation_stats, predict, task_losses
from models.spec import ModelSpec
from tests.trainer.test_meta import CFG, learner, random_batch
from tests.trainer.test_recipes import _omniglot_cfg
from trainer import evaluate as ev
from trainer.__main__ import final_evaluation
from trainer.config import RECIPES, apply_recipe, config_from_args
from trainer.evaluate import evaluate
from trainer.train import Trainer

SPEC = ModelSpec("tiny-bnwb", "conv4-omniglot", ways=3, inner_lr=0.4, steps=3, hidden=8, adapt_params="no-bn")
MLP = ModelSpec("tiny-bnwb-mlp", "mlp-omniglot", ways=3, inner_lr=0.4, steps=3, adapt_params="no-bn")


def meta_params(spec=SPEC, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in init_params(spec, g).items()}
    return {k: v.requires_grad_(requires_grad) for k, v in params.items()}


def distinct_rows(spec=SPEC, steps=2, seed=1) -> dict[str, torch.Tensor]:
    """Per-step gamma / beta far enough apart that using another step's row changes every output."""
    g = torch.Generator().manual_seed(seed)
    shapes = param_shapes(spec)
    return {k: (1.0 if k.endswith(".weight") else 0.0) + 0.5 * torch.randn(steps, shapes[k][0], generator=g)
            for k in bn_param_keys(spec)}


def tasks(spec=SPEC, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(n, 2 * spec.ways, *spec.input_shape, generator=g)
    sy = torch.stack([torch.randperm(2 * spec.ways, generator=g) % spec.ways for _ in range(n)])
    return sx, sy, torch.rand(n, 5, *spec.input_shape, generator=g)


def unrolled(spec, params, rows, sx, sy, steps, lr, keys, step_lrs=None, bn_running=None):
    """The inner loop by hand with models.functional.forward: step i's support forward with row min(i, S - 1) of
    every gamma / beta substituted, the trajectory entry after step i holding that row, the result row S - 1.
    Returns (fast, trajectory, support losses [steps + 1, T])."""
    count, tasks_ = next(iter(rows.values())).shape[0], sx.shape[0]

    def with_row(w, r):
        return {**w, **{k: v[r].unsqueeze(0).expand(tasks_, -1) for k, v in rows.items()}}

    def loss(w, step):
        stats = None if bn_running is None else running_at(bn_running, step, tasks_)
        return task_losses(spec, forward(spec, w, sx, stats=stats), sy)

    w = {k: v.detach().unsqueeze(0).expand(tasks_, *v.shape).clone().requires_grad_(k in keys)
         for k, v in params.items()}
    trajectory, losses = [], []
    for i in range(steps):
        w = with_row(w, min(i, count - 1))
        per_task = loss(w, i)
        losses.append(per_task.detach())
        grads = torch.autograd.grad(per_task.sum(), [w[k] for k in keys])
        rate = {k: lr if step_lrs is None or k not in step_lrs else step_lrs[k][min(i, len(step_lrs[k]) - 1)]
                for k in keys}
        w = {**w, **{k: (w[k] - rate[k] * g).detach().requires_grad_(True) for k, g in zip(keys, grads)}}
        trajectory.append({k: v.detach() for k, v in w.items()})
    w = with_row(w, count - 1)
    losses.append(loss(w, steps).detach())
    return {k: v.detach() for k, v in w.items()}, trajectory, torch.stack(losses)


# ---- the inner loop ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [SPEC, MLP], ids=["conv4", "mlp"])
@pytest.mark.parametrize("training", [False, True], ids=["serving", "training"])
def test_rows_equal_to_the_parameters_give_plain_no_bn_adapt(spec, training):
    params = meta_params(spec, requires_grad=training)
    keys = adapted_keys(spec, "no-bn")
    same = {k: params[k].detach().unsqueeze(0).repeat(3, 1) for k in bn_param_keys(spec)}
    sx, sy, _ = tasks(spec)
    plain = adapt(spec, params, sx, sy, 2, 0.4, second_order=training, track=True, adapt_keys=keys,
                  keep_trajectory=True)
    ours = adapt(spec, params, sx, sy, 2, 0.4, second_order=training, track=True, adapt_keys=keys,
                 keep_trajectory=True, step_bn=same)
    for k, v in plain.params.items():
        assert torch.equal(ours.params[k], v), k
    assert torch.equal(ours.support_loss, plain.support_loss)
    for a, b in zip(ours.trajectory, plain.trajectory):
        assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("which,rows,steps,extra", [
    ("no-bn", 2, 3, {}),  # more steps than rows: step 2 uses the last row
    ("no-bn", 3, 1, {}),  # fewer steps than rows: the result still holds the last row
    ("head", 2, 3, {}),  # ANIL: the body's features once per row
    ("no-bn", 2, 3, {"step_lrs": True, "bn_running": True}),  # with LSLR and per-step running statistics
], ids=["clamped", "fewer-steps", "anil", "lslr+running"])
def test_step_i_uses_row_min_i_and_the_adaptation_the_last_row(which, rows, steps, extra):
    spec = SPEC.with_(adapt_params=which)
    params, step_bn, keys = meta_params(spec), distinct_rows(spec, rows), list(adapted_keys(spec, which))
    sx, sy, _ = tasks(spec)
    options = {}
    if extra.get("step_lrs"):
        options["step_lrs"] = {k: torch.tensor([0.3, 0.1]) for k in keys}
    if extra.get("bn_running"):
        g = torch.Generator().manual_seed(5)
        options["bn_running"] = {k: torch.rand(2, c, generator=g) + 0.5 if k.endswith(".var")
                                 else 0.1 * torch.randn(2, c, generator=g) for k, (c,) in stats_shapes(spec).items()}
    got = adapt(spec, params, sx, sy, steps, 0.4, track=True, adapt_keys=keys, keep_trajectory=True,
                step_bn=step_bn, **options)
    fast, trajectory, losses = unrolled(spec, params, step_bn, sx, sy, steps, 0.4, keys, **options)
    for k, v in fast.items():
        torch.testing.assert_close(got.params[k], v, atol=1e-6, rtol=1e-5, msg=k)
    for k in step_bn:
        assert torch.equal(got.params[k][1], step_bn[k][-1]), k  # the final step's row, every task
    torch.testing.assert_close(got.support_loss, losses, atol=1e-6, rtol=1e-5)
    for i, (a, b) in enumerate(zip(got.trajectory, trajectory)):
        for k, v in b.items():
            torch.testing.assert_close(a[k], v, atol=1e-6, rtol=1e-5, msg=f"step {i} {k}")
        assert torch.equal(a["bn1.bias"][0], step_bn["bn1.bias"][min(i, rows - 1)])  # the step's own row
    # The check can fail: always row 0 (a plausible bug) gives other support losses.
    row0 = {k: v[:1].expand_as(v) for k, v in step_bn.items()}
    _, _, wrong = unrolled(spec, params, row0, sx, sy, steps, 0.4, keys, **options)
    assert not torch.allclose(wrong[1:], losses[1:], atol=1e-3)


def test_the_meta_gradient_reaches_the_rows_used_and_no_others():
    params = meta_params(requires_grad=True)
    keys = adapted_keys(SPEC, "no-bn")
    step_bn = {k: v.requires_grad_(True) for k, v in distinct_rows(SPEC, 3).items()}
    sx, sy, qx = tasks()
    names = list(step_bn)

    def row_grads(steps, second_order, msl=False):
        res = adapt(SPEC, params, sx, sy, steps, 0.4, second_order=second_order, adapt_keys=keys, step_bn=step_bn,
                    keep_trajectory=msl)
        outs = [predict(SPEC, f, qx, sx) for f in (res.trajectory if msl else [res.params])]
        loss = sum(o.square().mean() for o in outs)
        grads = torch.autograd.grad(loss, [step_bn[k] for k in names] + [params["bn0.weight"]], allow_unused=True)
        assert grads[-1] is None  # the parameters' own gamma is replaced by the rows: no gradient reaches it
        return {k: [bool(g[r].abs().sum() > 0) for r in range(3)] for k, g in zip(names, grads[:-1])}

    # 3 rows, 1 step: row 0 in the support forward, row 2 (the last) in the query forward, row 1 nowhere
    assert all(v == [True, False, True] for v in row_grads(1, True).values())
    assert all(v == [True, True, True] for v in row_grads(2, True).values())
    # First order: the support forward only shapes the inner gradient, a constant: row 0 learns nothing ...
    assert all(v == [False, False, True] for v in row_grads(1, False).values())
    # ... unless the multi-step loss predicts after step 0 with the trajectory's row 0 (MAML++'s per-step loss)
    assert all(v == [True, True, False] for v in row_grads(2, False, msl=True).values())


def test_adapt_refuses_step_bn_that_is_adapted_or_does_not_fit():
    params, step_bn = meta_params(), distinct_rows()
    sx, sy, _ = tasks()
    with pytest.raises(ValueError, match=r"step_bn \['bn0.bias', 'bn0.weight', .*also adapted in the inner loop"):
        adapt(SPEC, params, sx, sy, 1, 0.4, step_bn=step_bn)  # adapt_keys None: every parameter adapts
    keys = adapted_keys(SPEC, "no-bn")
    with pytest.raises(ValueError, match=r"step_bn \['conv0.weight'\] for model tiny-bnwb: expected a non-empty "
                                         r"subset of its batch-norm weights"):
        adapt(SPEC, params, sx, sy, 1, 0.4, adapt_keys=keys, step_bn={"conv0.weight": torch.ones(2, 8)})
    with pytest.raises(ValueError, match=r"step_bn\['bn1.weight'\] has shape \[2, 9\], expected \[steps, 8\]"):
        adapt(SPEC, params, sx, sy, 1, 0.4, adapt_keys=keys, step_bn={**step_bn, "bn1.weight": torch.ones(2, 9)})
    with pytest.raises(ValueError, match=r"holds \[2, 3\] steps, expected one step count"):
        adapt(SPEC, params, sx, sy, 1, 0.4, adapt_keys=keys, step_bn={**step_bn, "bn1.weight": torch.ones(3, 8)})


# ---- the checkpoint field ---------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = MetaModel(SPEC, meta_params(), step_bn=distinct_rows(SPEC, 2), provenance={"recipe": "maml++"})
    return save_checkpoint(tmp_path / "w.pt", model), model


def test_round_trip_keeps_the_per_step_weights(saved):
    path, model = saved
    loaded = load_checkpoint(path)
    assert loaded.bn_steps == 2 and set(loaded.step_bn) == set(bn_param_keys(SPEC))
    for k, v in model.step_bn.items():
        assert torch.equal(loaded.step_bn[k], v), k
    assert loaded.to("cpu").step_bn is not None
    assert dataclasses.replace(loaded, step_lrs=None).step_bn is loaded.step_bn  # the engine's rate rule keeps it


def test_checkpoints_without_the_field_still_load_and_do_not_write_it(tmp_path):
    path = save_checkpoint(tmp_path / "old.pt", MetaModel(SPEC, meta_params()))
    assert "step_bn" not in torch.load(path, weights_only=True)
    model = load_checkpoint(path)
    assert model.step_bn is None and model.bn_steps is None and not needs_reference(model)


def _rewrite(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)


def _rows(**changes):
    rows = distinct_rows(SPEC, 2)
    rows.update(changes)
    return {k: v for k, v in rows.items() if v is not None}


@pytest.mark.parametrize("bad,text", [
    (_rows(**{"bn2.bias": None}), r"'step_bn' does not fit conv4-omniglot: missing \['bn2.bias'\], unexpected \[\]"),
    (_rows(**{"bn9.weight": torch.ones(2, 8)}), r"'step_bn' does not fit conv4-omniglot: missing \[\], unexpected "
                                                r"\['bn9.weight'\]"),
    (_rows(**{"bn1.weight": torch.ones(2, 9)}), r"'step_bn.bn1.weight' is \[2, 9\] torch.float32, expected a float32 "
                                                r"tensor \[steps, 8\]"),
    (_rows(**{"bn1.weight": torch.ones(8)}), r"'step_bn.bn1.weight' is \[8\] torch.float32"),
    (_rows(**{"bn0.bias": torch.zeros(2, 8, dtype=torch.float64)}), r"'step_bn.bn0.bias' is \[2, 8\] torch.float64"),
    (_rows(**{"bn3.bias": torch.zeros(3, 8)}), r"'step_bn.bn3.bias' holds 3 steps, the other tensors 2"),
    (_rows(**{"bn0.weight": torch.full((2, 8), float("nan"))}), r"'step_bn.bn0.weight' holds NaN or Inf"),
    ([1, 2], r"'step_bn' is list, expected a dict of tensors"),
])
def test_malformed_per_step_weights_are_refused_naming_the_field(saved, bad, text):
    path, _ = saved
    _rewrite(path, step_bn=bad)
    with pytest.raises(CheckpointError, match=r"w.pt: " + text):
        load_checkpoint(path)


def test_per_step_weights_need_batch_norm_outside_the_inner_loop(saved, tmp_path):
    path, model = saved
    _rewrite(path, spec=SPEC.with_(adapt_params="all").to_dict())
    with pytest.raises(CheckpointError, match="w.pt: 'step_bn' is given, but adapt_params 'all' adapts the "
                                              "batch-norm weights"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="model tiny-bnwb has per-step batch-norm weights"):
        MetaModel(SPEC.with_(adapt_params="all"), model.params, step_bn=model.step_bn)
    sin = ModelSpec("sin", "mlp-sinusoid", ways=1, inner_lr=0.01, steps=1, adapt_params="no-bn")
    path = save_checkpoint(tmp_path / "sin.pt", MetaModel(sin, init_params(sin)))
    _rewrite(path, step_bn={"bn0.weight": torch.ones(1, 40)})
    with pytest.raises(CheckpointError, match="sin.pt: 'step_bn' is given, but mlp-sinusoid has no batch norm"):
        load_checkpoint(path)


# ---- meta-training ----------------------------------------------------------------------------------------------

def test_the_learner_learns_rows_not_the_parameters_own_batch_norm_weights():
    cfg = dataclasses.replace(apply_recipe(CFG, "maml+per-step-bn"), inner_steps=2, msl_epochs=2, epoch_iterations=4)
    m = learner(cfg)
    assert set(m.step_bn) == set(bn_param_keys(m.spec)) and m.step_bn["bn0.weight"].shape == (2, 8)
    for k, v in m.step_bn.items():  # initialised from the initialization, every step alike
        assert torch.equal(v, m.params[k].detach().unsqueeze(0).expand_as(v)), k
    leaves = {id(p) for group in m.optimizer.param_groups for p in group["params"]}
    assert all(id(m.params[k]) not in leaves and id(v) in leaves for k, v in m.step_bn.items())
    for it in range(2):
        m.step(random_batch(cfg, 3, seed=it), 1, it)
    for k, v in m.step_bn.items():
        assert not torch.equal(v[0], v[1]), k  # each step's row learned on its own (the multi-step loss)
        assert torch.equal(m.params[k], v[-1].detach()), k  # the parameters mirror the final step's row
    state = m.state_dict()
    other = learner(cfg, seed=1)
    other.load_state_dict(state)
    assert all(torch.equal(other.step_bn[k], v) for k, v in m.step_bn.items())
    with pytest.raises(ValueError, match="the training state has no per-step batch-norm weights"):
        other.load_state_dict({k: v for k, v in state.items() if k != "step_bn"})
    with pytest.raises(ValueError, match="but this run has per_step_bn off; expected --per_step_bn true"):
        learner(dataclasses.replace(cfg, per_step_bn=False)).load_state_dict(state)
    with pytest.raises(ValueError, match="per_step_bn with adapt_params 'all' for omniglot-5w1s"):
        learner(dataclasses.replace(cfg, adapt_params="all"))


KW = dict(iterations=10, hidden=8, meta_batch=4, inner_steps=2, msl_epochs=2, epoch_iterations=4,
          first_order_iterations=6)


def test_a_maml_plus_plus_run_with_per_step_weights_resumes_bit_for_bit_and_checkpoints_them(tmp_path, omniglot_root):
    assert RECIPES["maml++"]["per_step_bn"]
    straight = Trainer(_omniglot_cfg(tmp_path / "a", "maml++", **KW)).train()
    assert Trainer(_omniglot_cfg(tmp_path / "b", "maml++", **KW, max_seconds=1e-9)).train().iteration == 5
    resumed = Trainer(_omniglot_cfg(tmp_path / "b", "maml++", **KW), resume=True).train()
    for k, v in straight.learner.step_bn.items():
        assert torch.equal(v, resumed.learner.step_bn[k]), k
    for k, v in straight.learner.params.items():
        assert torch.equal(v, resumed.learner.params[k]), k
    result = final_evaluation(resumed)
    model = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert model.bn_steps == 2 and model.provenance["config"]["per_step_bn"]
    for k, v in resumed.learner.step_bn.items():
        assert torch.equal(model.step_bn[k], v), k
        assert torch.equal(model.params[k], v[-1]), k  # readers that ignore step_bn predict as the last step
    assert not torch.equal(model.step_bn["bn0.weight"][0], model.step_bn["bn0.weight"][1])
    assert needs_reference(model)
    best = load_checkpoint(tmp_path / "b" / "run" / "best.pt")
    want = evaluate(best.spec, best.params, resumed.samplers["test"](), resumed.cfg.eval_tasks,
                    resumed.cfg.eval_steps, best.inner_lr(), resumed.cfg.eval_chunk,
                    adapt_keys=adapted_keys(best.spec, "no-bn"), step_lrs=best.step_lrs, step_bn=best.step_bn)
    assert result["support"]["mean"] == pytest.approx(want["support"]["mean"])  # the final evaluation used them
    out = tmp_path / "evaluated"  # python -m trainer.evaluate: the checkpoint's own recipe, said in its report
    assert ev.main([str(tmp_path / "b" / "run" / "best.pt"), "--tasks", "40", "--out", str(out), "--device", "cpu",
                    "--data-root", str(omniglot_root)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["recipe"]["per_step_bn_steps"] == 2 and report["support"]["mean"] == pytest.approx(
        want["support"]["mean"])
    assert "per-step batch-norm weights for 2 steps" in (out / "results.md").read_text()

    # init_from: a checkpoint's per-step weights (rows min(s, S - 1) for a longer inner loop), or its one gamma / beta
    longer = Trainer(_omniglot_cfg(tmp_path / "c", "maml++", **{**KW, "inner_steps": 3},
                                   init_from=str(tmp_path / "b" / "run" / "last.pt")))
    for k, v in model.step_bn.items():
        assert torch.equal(longer.learner.step_bn[k], v[[0, 1, 1]]), k
    plain = Trainer(_omniglot_cfg(tmp_path / "d", "maml", iterations=1, hidden=8, meta_batch=4)).train()
    fresh = Trainer(_omniglot_cfg(tmp_path / "e", "maml++", **KW, init_from=str(tmp_path / "d" / "run" / "last.pt")))
    for k, v in fresh.learner.step_bn.items():
        assert torch.equal(v, plain.learner.params[k].detach().unsqueeze(0).expand_as(v)), k


@pytest.mark.parametrize("adapt_params", ["no-bn", "head"])  # head: the query features forwarded once per chunk
def test_evaluate_adapts_step_s_with_row_s_and_predicts_with_the_last_row(adapt_params):
    params, step_bn = meta_params(), distinct_rows(SPEC, 2)
    keys = adapted_keys(SPEC, adapt_params)
    g = torch.Generator().manual_seed(5)
    running = {k: torch.rand(2, c, generator=g) + 0.5 if k.endswith(".var") else 0.1 * torch.randn(2, c, generator=g)
               for k, (c,) in stats_shapes(SPEC).items()}
    sx, sy, qx = tasks(n=4, seed=3)
    qy = torch.randint(0, 3, qx.shape[:2], generator=g)

    class Fixed:
        def sample(self, n):
            return type("B", (), {"support_x": sx[:n], "support_y": sy[:n], "query_x": qx[:n], "query_y": qy[:n]})

    res = evaluate(SPEC, params, Fixed(), 4, 3, 0.4, 4, adapt_keys=keys, step_bn=step_bn, bn_running=running)
    for steps in range(4):
        for policy in ("transductive", "support", "running"):
            extra = {"bn_running": running} if policy == "running" else {}
            fast = adapt(SPEC, params, sx, sy, steps, 0.4, adapt_keys=keys, step_bn=step_bn, **extra).params
            out = predict(SPEC, fast, qx, sx, bn_policy=policy, bn_running=running)
            acc = (out.argmax(-1) == qy).float().mean() * 100
            assert res[policy]["mean"][steps] == pytest.approx(acc.item(), abs=1e-4), (policy, steps)


# ---- serving ----------------------------------------------------------------------------------------------------

def served_model(policy="support") -> MetaModel:
    step_bn = distinct_rows(SPEC, 2)
    params = {**meta_params(), **{k: v[-1].clone() for k, v in step_bn.items()}}
    return MetaModel(SPEC.with_(bn_policy=policy), params, step_bn=step_bn)


def test_the_reference_engine_adapts_and_predicts_with_the_per_step_weights():
    model, engine = served_model(), Engine("reference")
    assert recipe_options(model)["step_bn"] is model.step_bn and needs_reference(model)
    sx, sy, qx = tasks()
    result, logits = engine.adapt_predict(model, sx, sy, qx)
    want = adapt(SPEC, model.params, sx, sy, SPEC.steps, SPEC.inner_lr, track=True,
                 adapt_keys=adapted_keys(SPEC, "no-bn"), step_bn=model.step_bn)
    for k, v in want.params.items():
        torch.testing.assert_close(result.params[k], v, atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(result.support_loss, want.support_loss, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        expected = predict(SPEC, want.params, qx, stats=adaptation_stats(SPEC, want.params, sx))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.predict(model, result.params, qx, result.stats), expected, atol=1e-5,
                               rtol=1e-5)
    ignored = adapt(SPEC, model.params, sx, sy, SPEC.steps, SPEC.inner_lr, adapt_keys=adapted_keys(SPEC, "no-bn"))
    assert not torch.allclose(ignored.params["conv3.weight"], want.params["conv3.weight"], atol=1e-4)


@pytest.mark.parametrize("backend", [lambda: GraphBackend("cpu", capture=False), lambda: TritonBackend("cpu")],
                         ids=["graph", "triton"])
def test_graph_and_triton_backends_fall_back_to_the_reference_path(backend):
    model, b, ref = served_model(), backend(), ReferenceBackend("cpu")
    sx, sy, qx = tasks()
    got, logits = b.adapt_predict(model, sx, sy, qx, SPEC.steps, SPEC.inner_lr)
    want, want_logits = ref.adapt_predict(model, sx, sy, qx, SPEC.steps, SPEC.inner_lr)
    torch.testing.assert_close(logits, want_logits)
    for k, v in want.params.items():
        torch.testing.assert_close(got.params[k], v, msg=k)
    adapted = b.adapt(model, sx, sy, SPEC.steps, SPEC.inner_lr, True)
    torch.testing.assert_close(adapted.support_loss, want.support_loss)
    torch.testing.assert_close(b.predict(model, adapted.params, qx, adapted.stats),
                               ref.predict(model, adapted.params, qx, adapted.stats))


def test_an_adapted_step_bn_model_exports_to_onnx():
    import onnxruntime as ort  # pinned (requirements.txt: onnxruntime-gpu): missing, this fails rather than skips

    from models.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx

    model = served_model()
    sx, sy, qx = tasks(n=1)
    result = Engine("reference").adapt(model, sx, sy)
    onnx_model = export_onnx(SPEC, {k: v[0] for k, v in result.params.items()},
                             stats={k: v[0] for k, v in result.stats.items()})
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: qx[0].numpy()})
    with torch.no_grad():
        want = predict(SPEC, result.params, qx, stats=result.stats)[0]
    torch.testing.assert_close(torch.from_numpy(logits), want, atol=1e-4, rtol=0)


# ---- the config switch ------------------------------------------------------------------------------------------

def test_config_turns_per_step_weights_on_with_the_recipes_and_refuses_them_without_their_conditions(capsys):
    cfg, _ = config_from_args(["omniglot-20w1s", "--recipe", "maml+per-step-bn"])
    assert cfg.per_step_bn and cfg.adapt_params == "no-bn" and cfg.uses_recipe and not cfg.lslr
    cfg, _ = config_from_args(["omniglot-20w1s", "--recipe", "maml++"])
    assert cfg.per_step_bn
    anil, _ = config_from_args(["omniglot-5w1s", "--recipe", "anil", "--per_step_bn", "true"])
    assert anil.per_step_bn and anil.adapt_params == "head"  # ANIL: the body's BN outside the inner loop anyway
    off, _ = config_from_args(["omniglot-5w1s", "--recipe", "maml++", "--per_step_bn", "false"])
    assert not off.per_step_bn and off.lslr  # the preset without per-step weights (the recorded runs')
    assert not config_from_args(["omniglot-5w1s"])[0].uses_recipe
    for argv, text in (
        (["omniglot-5w1s", "--per_step_bn", "true"],
         "--per_step_bn true with --adapt_params 'all': the inner loop would adapt the batch-norm weights"),
        (["omniglot-5w1s", "--recipe", "maml++", "--adapt_params", "all"], "--adapt_params 'all'"),
        (["sinusoid", "--recipe", "maml++"],
         "--per_step_bn true: per-step batch-norm weights, but arch 'mlp-sinusoid' has no batch norm"),
        (["omniglot-5w1s", "--per_step_bn", "maybe"], "--per_step_bn: expected a boolean"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            config_from_args(argv)
        assert exit_info.value.code == 2
        assert text in capsys.readouterr().err, argv


def test_the_ab_command_has_a_per_step_bn_arm():
    from trainer.ab import ARMS

    recipe, _ = ARMS["maml+per-step-bn"]
    assert RECIPES[recipe] == {"adapt_params": "no-bn", "per_step_bn": True}
