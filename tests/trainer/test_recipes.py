"""The ANIL and MAML++ recipes: schedules as MAML++ defines them, what each updates, resume, and real-Omniglot runs."""

import dataclasses
import json
import math

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.functional import HEAD_KEYS, init_params
from models.maml import adapt, predict
from tests.trainer.test_meta import CFG, learner, random_batch
from trainer.__main__ import final_evaluation
from trainer.config import CONFIGS, RECIPES, apply_recipe, config_from_args
from trainer.evaluate import evaluate
from trainer.meta import cosine_lr, msl_weights
from trainer.train import Trainer, model_spec


def test_msl_weights_sum_to_one_and_anneal_toward_the_last_step():
    steps, epochs = 5, 20
    assert msl_weights(steps, 0, epochs) == pytest.approx([0.2] * 5)
    # MAML++: non-final weights lose 1/(S * epochs) per epoch down to 0.03/S; the last gains (S - 1) times that.
    assert msl_weights(steps, 10, epochs) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6])
    assert msl_weights(steps, 19, epochs) == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.96])
    previous = None
    for epoch in range(epochs):
        w = msl_weights(steps, epoch, epochs)
        assert sum(w) == pytest.approx(1.0), epoch
        assert min(w[:-1]) >= 0.03 / steps - 1e-12 and w[-1] <= 1 - 4 * 0.03 / steps + 1e-12
        if previous:
            assert w[-1] > previous[-1] and all(a <= b for a, b in zip(w[:-1], previous[:-1]))
        previous = w
    assert msl_weights(steps, epochs, epochs) is None  # after the anneal only the last step's loss counts
    assert msl_weights(steps, 0, 0) is None
    assert msl_weights(3, 39, 40) == pytest.approx([0.03 / 3, 0.03 / 3, 1 - 2 * 0.03 / 3])  # the floors bind


def test_cosine_meta_lr_goes_from_the_meta_lr_to_the_minimum():
    assert cosine_lr(1e-3, 1e-5, 0, 1000) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 1e-5, 500, 1000) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_lr(1e-3, 1e-5, 250, 1000) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(1e-3, 1e-5, 1000, 1000) == pytest.approx(1e-5)
    assert cosine_lr(1e-3, 1e-5, 5000, 1000) == pytest.approx(1e-5)  # a run continued past its schedule


def test_cosine_from_a_later_iteration_keeps_the_meta_lr_until_then():
    # A resumed long run anneals from where it is (--cosine_start): constant before, the same cosine shape after.
    assert cosine_lr(1e-3, 1e-5, 100, 1000, 400) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 1e-5, 400, 1000, 400) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 1e-5, 700, 1000, 400) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_lr(1e-3, 1e-5, 1000, 1000, 400) == pytest.approx(1e-5)


def test_anil_body_gets_meta_gradients_but_is_not_changed_by_the_inner_loop():
    cfg = apply_recipe(CFG, "anil")
    m = learner(cfg)
    sx, sy, qx, qy = random_batch(cfg, 3)
    fast = adapt(m.spec, m.params, sx, sy, cfg.inner_steps, cfg.inner_lr, adapt_keys=m.adapt_keys).params
    for k, v in m.params.items():
        moved = not torch.equal(fast[k][0], v.detach())
        assert moved == (k in HEAD_KEYS), k
    loss, _ = m.meta_loss(sx, sy, qx, qy, iteration=0)
    grads = dict(zip(m.params, torch.autograd.grad(loss, list(m.params.values()))))
    for k, g in grads.items():
        assert g.abs().sum() > 0, f"{k}: no meta-gradient"
    before = {k: v.detach().clone() for k, v in m.params.items()}
    m.step((sx, sy, qx, qy), 1, 0)
    assert all(not torch.equal(before[k], m.params[k].detach()) for k in m.params)  # the body is meta-learned


def test_lslr_learner_with_one_step_makes_the_meta_sgd_update_with_per_layer_rates():
    """One inner step: LSLR's [1]-shaped rate per tensor is Meta-SGD with that rate broadcast over the tensor."""
    cfg = dataclasses.replace(apply_recipe(CFG, "maml+lslr"), inner_steps=1)
    lslr, sgd = learner(cfg), learner(dataclasses.replace(CFG, algorithm="metasgd", inner_steps=1))
    batch = random_batch(cfg, 3)
    loss_a, _ = lslr.meta_loss(*batch, iteration=0)
    loss_b, _ = sgd.meta_loss(*batch)
    torch.testing.assert_close(loss_a, loss_b)
    ga = torch.autograd.grad(loss_a, list(lslr.params.values()) + list(lslr.step_lrs.values()))
    gb = torch.autograd.grad(loss_b, list(sgd.params.values()) + list(sgd.inner_lrs.values()))
    n = len(lslr.params)
    for a, b in zip(ga[:n], gb[:n]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for k, a, b in zip(lslr.params, ga[n:], gb[n:]):  # a per-tensor rate's gradient: the sum of its elements'
        torch.testing.assert_close(a, b.sum().reshape(1), atol=1e-6, rtol=1e-4, msg=k)


def test_msl_meta_loss_is_the_weighted_query_loss_after_every_step():
    cfg = dataclasses.replace(CFG, msl_epochs=4, epoch_iterations=10, inner_steps=3)
    m = learner(cfg)
    sx, sy, qx, qy = random_batch(cfg, 2)
    iteration = 25  # epoch 2 of 4
    loss, _ = m.meta_loss(sx, sy, qx, qy, iteration=iteration)
    expected = 0.0
    for w, steps in zip(msl_weights(3, 2, 4), (1, 2, 3)):
        fast = adapt(m.spec, m.params, sx, sy, steps, cfg.inner_lr, second_order=True).params
        out = predict(m.spec, fast, qx, sx, bn_policy=cfg.bn_policy)
        expected = expected + w * torch.nn.functional.cross_entropy(out.flatten(0, 1), qy.flatten())
    torch.testing.assert_close(loss, expected)
    late, _ = m.meta_loss(sx, sy, qx, qy, iteration=40)  # the anneal is over: last step only
    out = predict(m.spec, adapt(m.spec, m.params, sx, sy, 3, cfg.inner_lr).params, qx, sx, bn_policy=cfg.bn_policy)
    torch.testing.assert_close(late, torch.nn.functional.cross_entropy(out.flatten(0, 1), qy.flatten()))


def test_derivative_order_annealing_switches_to_second_order():
    cfg = dataclasses.replace(CFG, first_order_iterations=100)
    first, second = dataclasses.replace(CFG, algorithm="fomaml"), CFG
    batch = random_batch(cfg, 2)
    m, a, b = learner(cfg), learner(first), learner(second)
    for it, reference in ((99, a), (100, b)):
        ours = torch.autograd.grad(m.meta_loss(*batch, iteration=it)[0], list(m.params.values()))
        ref = torch.autograd.grad(reference.meta_loss(*batch)[0], list(reference.params.values()))
        for x, y in zip(ours, ref):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
    assert not cfg.second_order_at(99) and cfg.second_order_at(100)


def test_recipe_presets_and_overrides():
    cfg, _ = config_from_args(["omniglot-20w1s", "--recipe", "maml++", "--first_order_iterations", "0"])
    assert cfg.recipe == "maml++" and cfg.lslr and cfg.msl_epochs == 20 and cfg.cosine_lr
    assert cfg.adapt_params == "no-bn" and cfg.first_order_iterations == 0  # the override wins over the preset
    plain, _ = config_from_args(["omniglot-20w1s"])
    assert not plain.uses_recipe and plain.recipe == "maml"
    with pytest.raises(SystemExit):
        config_from_args(["omniglot-5w1s", "--recipe", "reptile"])
    with pytest.raises(ValueError, match="recipe 'reptile', expected one of"):
        apply_recipe(CFG, "reptile")
    assert set(RECIPES) >= {"maml", "anil", "maml++"}


def test_evaluate_adapts_with_each_steps_learned_rate():
    cfg = dataclasses.replace(CFG, hidden=8)
    spec = model_spec(cfg)
    meta = init_params(spec, torch.Generator().manual_seed(0))
    step_lrs = {k: torch.tensor([0.5, 0.05]) for k in meta}

    class Fixed:
        def __init__(self):
            self.batch = random_batch(cfg, 4, seed=3)

        def sample(self, n):
            sx, sy, qx, qy = (t[:n] for t in self.batch)
            return type("B", (), {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy})

    res = evaluate(spec, meta, Fixed(), 4, 3, 0.4, 4, policies=("transductive",), step_lrs=step_lrs)
    b = Fixed().sample(4)
    for steps in (1, 2, 3):
        fast = adapt(spec, meta, b.support_x, b.support_y, steps, 0.4, step_lrs=step_lrs).params
        acc = (predict(spec, fast, b.query_x, bn_policy="transductive").argmax(-1) == b.query_y).float().mean() * 100
        assert res["transductive"]["mean"][steps] == pytest.approx(acc.item(), abs=1e-4), steps


def _omniglot_cfg(tmp_path, recipe, **kw):
    base = dict(device="cpu", progress=False, out_dir=str(tmp_path / "run"), val_classes=20, val_tasks=20,
                eval_tasks=40, eval_steps=3, log_every=5, val_every=10, checkpoint_every=5)
    base.update(kw)
    return dataclasses.replace(apply_recipe(CONFIGS["omniglot-5w1s"], recipe), **base)  # kw win over the preset


@pytest.mark.parametrize("recipe,kw", [
    ("anil", dict(iterations=60, inner_steps=3)),
    ("proto-anil", dict(iterations=60, inner_steps=1)),  # the body learns through the prototypes alone
    # MAML++ first-order phase (LSLR, multi-step loss, BN not adapted); a cosine over 50 iterations would leave
    # half of them at a vanishing lr, so it is off here (tested above).
    ("maml++", dict(iterations=50, inner_steps=2, msl_epochs=4, epoch_iterations=10, cosine_lr=False)),
])
def test_a_few_real_omniglot_meta_iterations_beat_chance_clearly(tmp_path, recipe, kw):
    cfg = _omniglot_cfg(tmp_path, recipe, meta_batch=16, hidden=32, eval_tasks=100, eval_steps=3, meta_lr=3e-3, **kw)
    trainer = Trainer(cfg)
    spec, steps = trainer.spec, cfg.inner_steps
    untrained = init_params(spec, torch.Generator().manual_seed(cfg.seed))
    keys, step_lrs = trainer.learner.adapt_keys, trainer.learner.step_lrs
    before = evaluate(spec, untrained, trainer.samplers["test"](), 100, steps, cfg.inner_lr, 100, adapt_keys=keys,
                      step_lrs=None if step_lrs is None else {k: v.detach().clone() for k, v in step_lrs.items()})
    trainer.train()
    after = evaluate(spec, trainer.learner.params, trainer.samplers["test"](), 100, steps, cfg.inner_lr, 100,
                     adapt_keys=keys, step_lrs=step_lrs)
    for policy in ("transductive", "support"):
        b, a = before[policy]["mean"][steps], after[policy]["mean"][steps]
        margin = after[policy]["ci95"][steps] + before[policy]["ci95"][steps]
        assert a - b > margin and a > 20 + 3 * after[policy]["ci95"][steps], f"{recipe} {policy}: {b:.1f}% -> {a:.1f}%"


def test_a_maml_plus_plus_run_resumes_bit_for_bit_and_its_checkpoint_carries_the_recipe(tmp_path):
    kw = dict(iterations=10, hidden=8, meta_batch=4, inner_steps=2, msl_epochs=2, epoch_iterations=4,
              first_order_iterations=6)
    straight = Trainer(_omniglot_cfg(tmp_path / "a", "maml++", **kw)).train()
    # Interrupted by the clock at the first log point (iteration 5), so the cosine keeps its 10-iteration length.
    assert Trainer(_omniglot_cfg(tmp_path / "b", "maml++", **kw, max_seconds=1e-9)).train().iteration == 5
    resumed = Trainer(_omniglot_cfg(tmp_path / "b", "maml++", **kw), resume=True).train()
    for k, v in straight.learner.params.items():
        assert torch.equal(v, resumed.learner.params[k]), k
    for k, v in straight.learner.step_lrs.items():
        assert torch.equal(v, resumed.learner.step_lrs[k]), k
    final_evaluation(resumed)
    model = load_checkpoint(tmp_path / "b" / "run" / "best.pt")
    assert model.spec.adapt_params == "no-bn" and set(model.step_lrs) == set(resumed.learner.step_lrs)
    assert model.step_lrs["conv0.weight"].shape == (2,) and model.provenance["config"]["recipe"] == "maml++"


def test_a_constant_lr_run_resumed_with_a_cosine_anneals_from_where_it_stopped(tmp_path):
    # Adam's saved lr (1e-3 here) must give way to the cosine starting at the resume point.
    kw = dict(iterations=5, hidden=8, meta_batch=4, meta_lr=1e-3)
    Trainer(_omniglot_cfg(tmp_path, "anil", **kw)).train()
    later = dict(kw, iterations=9, cosine_lr=True, cosine_start=5, min_meta_lr=1e-5, meta_lr=2e-3)
    resumed = Trainer(_omniglot_cfg(tmp_path, "anil", **later), resume=True)
    assert resumed.iteration == 5 and resumed.learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    resumed.train()
    # The last update ran at iteration 8 of the 5..9 cosine.
    want = cosine_lr(2e-3, 1e-5, 8, 9, 5)
    assert resumed.iteration == 9 and resumed.learner.optimizer.param_groups[0]["lr"] == pytest.approx(want)
    assert 1e-5 < want < 2e-3 * 0.5
    with pytest.raises(SystemExit):
        config_from_args(["omniglot-20w1s", "--cosine_lr", "true", "--cosine_start", "9", "--iterations", "9"])


def test_init_from_starts_at_another_checkpoints_parameters(tmp_path):
    donor = Trainer(_omniglot_cfg(tmp_path / "donor", "maml", iterations=3, hidden=8, meta_batch=4)).train()
    path = tmp_path / "donor" / "run" / "last.pt"
    t = Trainer(_omniglot_cfg(tmp_path / "anil", "anil", iterations=3, hidden=8, meta_batch=4, init_from=str(path)))
    for k, v in donor.learner.params.items():
        assert torch.equal(v, t.learner.params[k]), k
    assert t.provenance()["init_from"]["iterations"] == 3
    with pytest.raises(ValueError, match="16 filters, expected 5 / 8"):
        bad = _omniglot_cfg(tmp_path / "x", "maml", iterations=1, hidden=16, meta_batch=4)
        Trainer(bad).train()
        Trainer(_omniglot_cfg(tmp_path / "y", "anil", hidden=8, init_from=str(tmp_path / "x" / "run" / "last.pt")))


def test_a_proto_head_run_starts_from_a_checkpoint_of_fewer_ways(tmp_path):
    """Higher-way training: an 8-way Proto-ANIL run from a 5-way model copies the body (the head, never read with a
    prototype head, keeps its fresh [8, F] initialization) and trains; a meta-learned head (anil) refuses."""
    donor = Trainer(_omniglot_cfg(tmp_path / "donor", "proto-anil", iterations=2, hidden=8, meta_batch=2)).train()
    path = str(tmp_path / "donor" / "run" / "last.pt")
    t = Trainer(_omniglot_cfg(tmp_path / "wide", "proto-anil", ways=8, iterations=2, hidden=8, meta_batch=2,
                              init_from=path, final_eval=False))
    for k, v in donor.learner.params.items():
        if k in HEAD_KEYS:
            assert t.learner.params[k].shape[0] == 8 and v.shape[0] == 5, k
        else:
            assert torch.equal(v, t.learner.params[k]), k
    t.train()
    assert t.iteration == 2 and t.provenance()["init_from"]["name"] == donor.spec.name
    with pytest.raises(ValueError, match="5 ways / 8 filters, expected 8 / 8 .*other ways only with --head_init proto"):
        Trainer(_omniglot_cfg(tmp_path / "meta", "anil", ways=8, hidden=8, meta_batch=2, init_from=path))


def test_ab_gives_every_arm_the_same_cpu_time_and_writes_its_report(tmp_path):
    from trainer.ab import main

    out = tmp_path / "ab"
    assert main(["--config", "omniglot-5w1s", "--cpu-minutes", "0.01", "--eval-every", "1", "--eval-tasks", "10",
                 "--arms", "anil,maml+fo-warmup", "--out", str(out)]) == 0
    result = json.loads((out / "ab.json").read_text())
    assert list(result["arms"]) == ["anil", "maml+fo-warmup"]
    for arm in result["arms"].values():
        assert 0.6 <= arm["cpu_seconds"] <= 0.6 + 5 * arm["seconds_per_iteration"] + 1  # stops once the budget is spent
        assert arm["points"][-1]["iterations"] == arm["iterations"] > 0
    assert result["arms"]["anil"]["config"]["adapt_params"] == "head"
    table = (out / "README.md").read_text()
    assert "| anil |" in table and "| maml+fo-warmup |" in table and (out / "ab.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["--arms", "reptile", "--out", str(out)])


def test_proto_anil_preset_and_a_proto_head_without_it_is_refused(capsys):
    cfg, _ = config_from_args(["omniglot-20w1s", "--recipe", "proto-anil"])
    assert cfg.head_init == "proto" and cfg.adapt_params == "head" and model_spec(cfg).head_init == "proto"
    for argv, needle in ((["--head_init", "proto"], "--adapt_params 'all'"), (["--head_init", "mean"], "'mean'")):
        with pytest.raises(SystemExit) as exc:
            config_from_args(["omniglot-5w1s", *argv])
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_train_within_alphabet_draws_that_share_of_each_meta_batch_from_one_background_alphabet(tmp_path, capsys):
    from trainer.data.omniglot import load_omniglot, omniglot_split_alphabets

    cfg = _omniglot_cfg(tmp_path, "proto-anil", train_within_alphabet=0.5, iterations=4, hidden=8, meta_batch=8,
                        log_every=2, val_every=2, checkpoint_every=2, eval_tasks=20)
    trainer = Trainer(cfg)
    train = omniglot_split_alphabets(load_omniglot(cfg.data_root or None), "background", 0, 20)["train"]
    sampler = trainer.samplers["train"]
    assert sampler.within_fraction == 0.5 and set(sampler.alphabet_names) <= set(train)
    batch = sampler.sample(cfg.meta_batch)
    assert batch.alphabet.tolist()[4:] == [-1] * 4
    for t in range(4):  # the hard half: five characters of one alphabet of the train split
        assert {train[c] for c in batch.classes[t].tolist()} == {sampler.alphabet_names[batch.alphabet[t]]}
    trainer.train()
    final_evaluation(trainer)
    model = load_checkpoint(tmp_path / "run" / "best.pt")
    assert model.provenance["config"]["train_within_alphabet"] == 0.5
    # validation and meta-test stay random tasks
    assert trainer.samplers["test"]().within_alphabet is False
    for value, needle in (("1.5", "--train_within_alphabet 1.5: the share"), ("-1", "expected a number in [0, 1]")):
        with pytest.raises(SystemExit) as exc:
            config_from_args(["omniglot-20w1s", "--train_within_alphabet", value])
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_from_args(["sinusoid", "--train_within_alphabet", "0.5"])
    assert "alphabets are Omniglot's" in capsys.readouterr().err


def test_rotation_classes_train_on_character_rotation_pairs_and_bad_combinations_are_refused(tmp_path, capsys):
    cfg = _omniglot_cfg(tmp_path, "proto-anil", rotation_classes=True, iterations=2, hidden=8, meta_batch=8,
                        log_every=2, val_every=2, checkpoint_every=2, final_eval=False)
    trainer = Trainer(cfg)
    sampler = trainer.samplers["train"]
    assert sampler.rotation_classes and not trainer.samplers["test"]().rotation_classes
    batch = sampler.sample(1000)
    # 5 of 4 x 944 pairs: a task holds one character twice (as two rotations) with probability ~0.008, so ~8 of
    # 1,000 tasks do, where random tasks of characters never can
    assert any(len(set(row.tolist())) < 5 for row in batch.classes)
    assert all(len(set(row.tolist())) == 5 for row in batch.rotations * sampler.n_classes + batch.classes)
    trainer.train()
    assert trainer.provenance()["config"]["rotation_classes"] is True
    for argv in (["--rotation_classes", "true", "--rotate", "false"],
                 ["--rotation_classes", "true", "--train_within_alphabet", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            config_from_args(["omniglot-20w1s", *argv])
        assert exc.value.code == 2 and "expected --rotate true, random tasks" in capsys.readouterr().err


def test_train_shift_augments_the_train_tasks_alone_and_bad_values_are_refused(tmp_path, capsys):
    cfg = _omniglot_cfg(tmp_path, "proto-anil", train_shift=2, iterations=2, hidden=8, meta_batch=8,
                        log_every=2, val_every=2, checkpoint_every=2, final_eval=False)
    trainer = Trainer(cfg)
    assert trainer.samplers["train"].shift == 2 and trainer.samplers["test"]().shift == 0
    trainer.train()
    assert trainer.provenance()["config"]["train_shift"] == 2
    for argv in (["omniglot-20w1s", "--train_shift", "5"], ["sinusoid", "--train_shift", "1"]):
        with pytest.raises(SystemExit) as exc:
            config_from_args(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "expected 0, or 1-4 pixels for an Omniglot conv4 model" in err


def test_train_tilt_and_scale_warp_the_train_tasks_alone_and_bad_values_are_refused(tmp_path, capsys):
    cfg = _omniglot_cfg(tmp_path, "proto-anil", train_shift=1, train_tilt=10.0, train_scale=0.1, iterations=2,
                        hidden=8, meta_batch=8, log_every=2, val_every=2, checkpoint_every=2, final_eval=False)
    trainer = Trainer(cfg)
    train, test = trainer.samplers["train"], trainer.samplers["test"]()
    assert (train.shift, train.tilt, train.scale) == (1, 10.0, 0.1) and (test.tilt, test.scale) == (0.0, 0.0)
    trainer.train()
    assert trainer.provenance()["config"]["train_tilt"] == 10.0
    assert trainer.provenance()["config"]["train_scale"] == 0.1
    for argv in (["omniglot-20w1s", "--train_tilt", "50"], ["omniglot-20w1s", "--train_scale", "0.5"],
                 ["sinusoid", "--train_tilt", "5"]):
        with pytest.raises(SystemExit) as exc:
            config_from_args(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "expected degrees in [0, 45] and an axis stretch in [0, 0.5)" in err
        assert argv[-1] in err
