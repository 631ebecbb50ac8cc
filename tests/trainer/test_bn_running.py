"""Estimating per-step batch-norm running statistics (MAML++ BNRS): the exponential moving average during
meta-training, the post-hoc mean over tasks (`python -m trainer.bn_running`), and `python -m trainer.evaluate`'s
third column. Every expected statistic is computed independently, one task at a time with torch layers."""

import argparse
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import MetaModel, load_checkpoint, save_checkpoint
from models.functional import HEAD_KEYS, init_params, stats_shapes
from models.maml import adapt, predict
from models.spec import ModelSpec
from tests.models.test_bn_running import task_forward
from tests.trainer.test_meta import CFG, learner, random_batch
from tests.trainer.test_recipes import _omniglot_cfg
from trainer import bn_running as bnr
from trainer import evaluate as ev
from trainer.__main__ import final_evaluation
from trainer.config import CONFIGS, config_from_args
from trainer.data.omniglot import load_omniglot, omniglot_split
from trainer.data.sampler import omniglot_sampler
from trainer.train import Trainer


def per_step_moments(spec, params, sx, sy, steps, lr, keys=None):
    """One task: the (mean, unbiased var) of every batch-norm layer in the support forward of steps 0..steps-1,
    with plain SGD on the sum/K cross-entropy of the parameters in keys (None: all)."""
    w = {k: v.detach().clone().requires_grad_(keys is None or k in keys) for k, v in params.items()}
    out = []
    for _ in range(steps):
        moments: list = []
        logits = task_forward(spec, w, sx, record=moments)
        out.append({**{f"bn{i}.mean": m.detach() for i, (m, _) in enumerate(moments)},
                    **{f"bn{i}.var": v.detach() for i, (_, v) in enumerate(moments)}})
        loss = F.cross_entropy(logits, sy, reduction="sum") / max(1, sx.shape[0] // spec.ways)
        names = [k for k in w if w[k].requires_grad]
        grads = torch.autograd.grad(loss, [w[k] for k in names])
        w = {**w, **{k: (w[k] - lr * g).detach().requires_grad_(True) for k, g in zip(names, grads)}}
    return out


# ---- the moving average during meta-training ----------------------------------------------------------------------

def test_two_meta_iterations_fold_every_tasks_step_statistics_into_a_torch_style_average():
    cfg = dataclasses.replace(CFG, bn_running=True, inner_steps=2, meta_batch=3)
    m, plain = learner(cfg), learner(dataclasses.replace(cfg, bn_running=False))
    spec = m.spec
    want = {k: torch.full((2, c), 1.0 if k.endswith(".var") else 0.0) for k, (c,) in stats_shapes(spec).items()}
    for it in range(2):
        sx, sy, qx, qy = random_batch(cfg, 3, seed=it)
        before = {k: v.detach().clone() for k, v in m.params.items()}
        for t in range(3):  # tasks in meta-batch order, one torch batch-norm update each (momentum 0.1)
            for s, stats in enumerate(per_step_moments(spec, before, sx[t], sy[t], 2, cfg.inner_lr)):
                for k, x in stats.items():
                    want[k][s] = 0.9 * want[k][s] + 0.1 * x
        m.step((sx, sy, qx, qy), 1, it)
        plain.step((sx, sy, qx, qy), 1, it)
    for k, v in want.items():
        torch.testing.assert_close(m.bn_running[k], v, atol=1e-5, rtol=1e-5, msg=k)
    assert m.bn_updates == 6 and not torch.equal(want["bn0.mean"][0], want["bn0.mean"][1])
    for k, v in plain.params.items():  # estimating the statistics does not change the meta-updates
        if not (k.startswith("conv") and k.endswith(".bias")):  # BN-cancelled: Adam amplifies rounding (test_meta)
            torch.testing.assert_close(m.params[k], v, atol=1e-5, rtol=0, msg=k)


def test_a_run_with_bn_running_resumes_bit_for_bit_and_serves_under_running(tmp_path):
    kw = dict(iterations=10, hidden=8, meta_batch=4, inner_steps=2, bn_running=True, serve_bn_policy="running")
    straight = Trainer(_omniglot_cfg(tmp_path / "a", "anil", **kw)).train()
    assert Trainer(_omniglot_cfg(tmp_path / "b", "anil", **kw, max_seconds=1e-9)).train().iteration == 5
    resumed = Trainer(_omniglot_cfg(tmp_path / "b", "anil", **kw), resume=True).train()
    for k, v in straight.learner.bn_running.items():
        assert torch.equal(v, resumed.learner.bn_running[k]), k
    result = final_evaluation(resumed)
    assert set(result) >= {"transductive", "support", "running"}
    model = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert model.spec.bn_policy == "running" and model.running_steps == 2
    for k, v in resumed.learner.bn_running.items():
        assert torch.equal(model.bn_running[k], v), k
    how = model.provenance["bn_running"]
    assert how["method"] == "ema" and how["momentum"] == 0.1 and how["updates"] == 40
    assert "running" in load_checkpoint(tmp_path / "b" / "run" / "best.pt").provenance["meta_test"]
    with pytest.raises(ValueError, match="serve_bn_policy 'running' for omniglot-5w1s: the checkpoints need running"):
        Trainer(_omniglot_cfg(tmp_path / "c", "anil", **{**kw, "bn_running": False}))


def test_config_refuses_running_without_its_statistics(capsys):
    cfg, _ = config_from_args(["omniglot-5w1s", "--bn_running", "true", "--serve_bn_policy", "running"])
    assert cfg.bn_running and cfg.uses_recipe and cfg.bn_momentum == 0.1
    for argv, text in ((["--serve_bn_policy", "running"], "--serve_bn_policy running serves with per-step running"),
                       (["--bn_policy", "running"], "--bn_policy 'running': meta-training normalizes with batch"),
                       (["--bn_running", "true", "--bn_momentum", "0"], "--bn_momentum 0.0: expected 0 < momentum"),
                       (["--serve_bn_policy", "runing"], "--serve_bn_policy 'runing', expected transductive")):
        with pytest.raises(SystemExit):
            config_from_args(["omniglot-5w1s", *argv])
        assert text in capsys.readouterr().err
    metasgd, _ = config_from_args(["omniglot-5w1s", "--algorithm", "metasgd", "--bn_running", "true"])
    assert metasgd.bn_running  # the statistics are no rate recipe: Meta-SGD may estimate them too


# ---- post hoc -----------------------------------------------------------------------------------------------------

def _trained_checkpoint(path, omniglot_root, adapt_params="all", steps=2):
    cfg = dataclasses.replace(CONFIGS["omniglot-5w1s"], hidden=8, adapt_params=adapt_params, val_classes=20,
                              data_root="/elsewhere")  # a training machine's path: --data-root wins
    spec = ModelSpec("tiny-5w1s", "conv4-omniglot", ways=5, inner_lr=0.4, steps=steps, hidden=8,
                     adapt_params=adapt_params)
    params = init_params(spec, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    return save_checkpoint(path, MetaModel(spec, params, provenance={"config": dataclasses.asdict(cfg),
                                                                      "iterations": 3})), cfg


@pytest.mark.parametrize("adapt_params", ["all", "head"])
def test_post_hoc_statistics_are_the_mean_of_each_tasks_step_statistics(tmp_path, omniglot_root, adapt_params):
    path, cfg = _trained_checkpoint(tmp_path / "m.pt", omniglot_root, adapt_params)
    out = tmp_path / "m-running.pt"
    assert bnr.main([str(path), "--tasks", "5", "--chunk", "3", "--out", str(out), "--device", "cpu",
                     "--data-root", str(omniglot_root)]) == 0
    model, source = load_checkpoint(out), load_checkpoint(path)
    assert model.spec == source.spec.with_(name="tiny-5w1s-running", bn_policy="running")
    for k, v in source.params.items():
        assert torch.equal(model.params[k], v), k
    # The same tasks, drawn independently of the CLI: the split's meta-training classes, rotated as in training.
    train = omniglot_split(load_omniglot(omniglot_root), "background", seed=0, val_classes=20)["train"]
    sampler = omniglot_sampler(train, 5, 1, cfg.queries, rotate=True, seed=bnr.ESTIMATE_SEED)
    batches = [sampler.sample(3), sampler.sample(2)]
    keys = None if adapt_params == "all" else HEAD_KEYS
    per_task = [per_step_moments(source.spec, source.params, b.support_x[t], b.support_y[t], 2, 0.4, keys)
                for b in batches for t in range(b.support_x.shape[0])]
    for k in stats_shapes(source.spec):
        want = torch.stack([torch.stack([task[s][k] for s in range(2)]) for task in per_task]).mean(0)
        torch.testing.assert_close(model.bn_running[k], want, atol=1e-5, rtol=1e-4, msg=k)
    differ = not torch.allclose(model.bn_running["bn3.mean"][0], model.bn_running["bn3.mean"][1])
    assert differ == (adapt_params == "all")  # ANIL: the body does not adapt, so every step shares its statistics
    how = model.provenance["bn_running"]
    assert how["method"] == "post-hoc mean over tasks" and how["tasks"] == 5 and how["steps"] == 2
    assert how["from_sha256"] and how["from_bn_policy"] == "support" and how["split"] == "background"
    assert how["rotate"] is True and how["adapt_params"] == adapt_params and model.provenance["iterations"] == 3
    assert set(how["between_task_variance_ratio"]) == {"bn0", "bn1", "bn2", "bn3"}


@pytest.mark.parametrize("args,message", [
    (["--tasks", "0"], "--tasks 0: expected an integer >= 1"),
    (["--chunk", "-1"], "--chunk -1: expected an integer >= 1"),
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--policy", "batch"], "--policy 'batch': expected one of"),
    (["--out", "x.ckpt"], "--out x.ckpt: expected a .pt file"),
    (["--device", "cuda:7"], "--device cuda:7"),
])
def test_bad_arguments_exit_2_naming_the_value(tmp_path, omniglot_root, args, message, capsys):
    path, _ = _trained_checkpoint(tmp_path / "m.pt", omniglot_root)
    argv = [str(path), "--out", str(tmp_path / "new.pt"), *args]
    if torch.cuda.device_count() > 7 and args[0] == "--device":
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as exit_info:
        bnr.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_input_is_never_replaced_and_models_without_batch_norm_are_refused(tmp_path, omniglot_root, capsys):
    path, _ = _trained_checkpoint(tmp_path / "m.pt", omniglot_root)
    before = path.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        bnr.main([str(path), "--out", str(path)])
    assert exit_info.value.code == 2 and "is CHECKPOINT itself: expected a new file" in capsys.readouterr().err
    assert path.read_bytes() == before
    spec = ModelSpec("sin", "mlp-sinusoid", ways=1, inner_lr=0.01, steps=1)
    sin = save_checkpoint(tmp_path / "sin.pt", MetaModel(spec, init_params(spec)))
    with pytest.raises(SystemExit):
        bnr.main([str(sin), "--out", str(tmp_path / "x.pt")])
    assert "a mlp-sinusoid model has no batch norm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bnr.main([str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.pt")])
    assert "none.pt: no such file" in capsys.readouterr().err


# ---- evaluation -------------------------------------------------------------------------------------------------

def test_evaluate_adds_a_running_column_that_adapts_and_predicts_with_the_statistics(tmp_path, omniglot_root):
    path, _ = _trained_checkpoint(tmp_path / "m.pt", omniglot_root)
    out = tmp_path / "m-running.pt"
    assert bnr.main([str(path), "--tasks", "4", "--out", str(out), "--device", "cpu",
                     "--data-root", str(omniglot_root)]) == 0
    model = load_checkpoint(out)
    res_dir = tmp_path / "eval"
    assert ev.main([str(out), "--tasks", "6", "--steps", "3", "--out", str(res_dir), "--device", "cpu",
                    "--data-root", str(omniglot_root)]) == 0
    result = json.loads((res_dir / "results.json").read_text())
    assert len(result["running"]["mean"]) == 4 and result["bn_running"]["steps"] == 2
    assert result["bn_running"]["estimated"]["tasks"] == 4
    markdown = (res_dir / "results.md").read_text()
    assert "| inner steps | transductive | support | running |" in markdown
    assert "BN running statistics: 2 steps; method post-hoc mean over tasks, tasks 4" in markdown
    # By hand on the same tasks: s steps adapted with entries 0, 1, 1, ... of the statistics, the queries
    # normalized with the last entry.
    args = argparse.Namespace(split=None, data_root=str(omniglot_root), ways=5, shots=1, queries=1, seed=ev.TEST_SEED,
                              device="cpu", within_alphabet=False)
    b = ev._omniglot_sampler(args, model, [])[0].sample(6)
    for s in range(4):
        fast = adapt(model.spec, model.params, b.support_x, b.support_y, s, 0.4, bn_running=model.bn_running)
        with torch.no_grad():
            out_s = predict(model.spec, fast.params, b.query_x, bn_running=model.bn_running)
        acc = (out_s.argmax(-1) == b.query_y).float().mean() * 100
        assert result["running"]["mean"][s] == pytest.approx(acc.item(), abs=1e-4), s


def _rank_worker(rank, world, port, out_path):
    import os

    import torch.distributed as dist

    from tests.trainer.test_meta import leave_gloo_worker
    from trainer.train import rank_slice

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = dataclasses.replace(CFG, bn_running=True)
    m = learner(cfg)
    m.step(rank_slice(random_batch(cfg, 4), rank, world), world, 0)
    if rank == 0:
        torch.save({k: v.clone() for k, v in m.bn_running.items()} | {"updates": torch.tensor(m.bn_updates)}, out_path)
    leave_gloo_worker()


@pytest.mark.slow  # two torch.distributed processes
def test_two_gloo_ranks_average_the_whole_meta_batch_in_task_order(tmp_path):
    import torch.multiprocessing as mp

    from tests.trainer.test_meta import _free_port

    out = tmp_path / "ranked.pt"
    mp.spawn(_rank_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    single = learner(dataclasses.replace(CFG, bn_running=True))
    single.step(random_batch(CFG, 4), 1, 0)
    ranked = torch.load(out, weights_only=True)
    assert int(ranked.pop("updates")) == single.bn_updates == 4
    for k, v in single.bn_running.items():
        torch.testing.assert_close(ranked[k], v, atol=1e-6, rtol=1e-6, msg=k)
