"""The paper's pretrained baseline (`--algorithm pretrained`), `python -m trainer.rl.evaluate` over saved policies,
and the per-environment paper rows and protocol notes of the results (tiny settings throughout)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from models.policy import PolicyModel, PolicySpec, init_policy, load_policy, policy_forward, save_policy
from trainer.rl import evaluate as ev
from trainer.rl.config import RL_CONFIGS, rl_config_from_args
from trainer.rl.main import PAPER, PROTOCOL_NOTES, paper_curves, results_markdown
from trainer.rl.maml_trpo import MetaObjective, TRPOSettings, flatten, unflatten
from trainer.rl.plots import plot_rl_steps
from trainer.rl.sampler import Trajectories
from trainer.rl.train import RLTrainer, meta_update, pretraining_batch

ROOT = Path(__file__).resolve().parents[2]
SPEC = PolicySpec("tiny", "navigation-2d", 2, 2, hidden=(4, 3), init_std=0.7)
PRETRAINED = dataclasses.replace(RL_CONFIGS["navigation-2d"], algorithm="pretrained")
TINY = dataclasses.replace(PRETRAINED, hidden=8, meta_batch=3, trajectories=4, horizon=12, progress=False,
                           checkpoint_every=1000)
TINY_ARGV = ["--iterations", "2", "--hidden", "8", "--meta_batch", "2", "--trajectories", "2", "--horizon", "10",
             "--eval_tasks", "3", "--eval_trajectories", "2", "--progress", "false"]


def tiny_round(seed, tasks=2, batch=3, horizon=5) -> tuple[Trajectories, torch.Tensor]:
    """Random float64 trajectories of unequal lengths (padding zero) and advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, horizon + 1, (tasks, batch), generator=g)
    mask = (torch.arange(horizon) < lengths.unsqueeze(-1)).to(torch.float64)
    obs = torch.randn(tasks, batch, horizon, 2, generator=g, dtype=torch.float64) * mask.unsqueeze(-1)
    actions = torch.randn(tasks, batch, horizon, 2, generator=g, dtype=torch.float64) * mask.unsqueeze(-1)
    adv = torch.randn(tasks, batch, horizon, generator=g, dtype=torch.float64) * mask
    return Trajectories(obs, actions, torch.zeros(tasks, batch, horizon, dtype=torch.float64), lengths), adv


def tiny_params(seed=0):
    params = init_policy(SPEC, torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.1 * torch.randn(v.shape, generator=noise, dtype=torch.float64) for k, v in params.items()}


def plain_trpo(params, old, traj, adv):
    """Plain TRPO on one round, written out with torch.distributions: the policy's own likelihood ratio against
    `old` (mean, std) times the advantage, and KL(old || new), each a mean over a task's steps, then over tasks."""
    mean, log_std = policy_forward(SPEC, params, traj.observations)
    new = Normal(mean, torch.exp(log_std).expand_as(mean))
    ratio = torch.exp(new.log_prob(traj.actions).sum(-1) - Normal(*old).log_prob(traj.actions).sum(-1))
    mask = traj.mask
    steps = mask.sum((1, 2))
    loss = -((ratio * adv * mask).sum((1, 2)) / steps).mean()
    kl = ((kl_divergence(Normal(*old), new).sum(-1) * mask).sum((1, 2)) / steps).mean()
    return loss, kl


def old_policy(params, traj):
    mean, log_std = policy_forward(SPEC, params, traj.observations)
    return mean.detach(), torch.exp(log_std).expand_as(mean).detach()


# ---- the update: MAML-TRPO with zero inner steps is plain TRPO on the pre-update round ----

@pytest.mark.parametrize("max_kl", [1e-2, 1e-4])
def test_pretrained_update_is_plain_trpo_on_the_pre_update_round(max_kl):
    params = tiny_params()
    train, adv = tiny_round(2)
    batch = pretraining_batch(train, adv)
    assert batch.valid is batch.train and batch.valid_adv is batch.train_adv  # no post-update round
    new, info = meta_update(SPEC, params, batch, PRETRAINED, TRPOSettings(max_kl=max_kl))
    assert "rejected" not in info
    assert all(not torch.equal(new[k], params[k]) for k in params)  # every parameter moves, the log-std too
    old = old_policy(params, train)
    loss_before, kl_before = plain_trpo(params, old, train, adv)
    loss_after, kl_after = plain_trpo(new, old, train, adv)
    assert kl_before.item() == pytest.approx(0.0, abs=1e-14)
    # the logged surrogate and KL before and after the accepted step are plain TRPO's on the pre-update round
    assert info["loss_before"] == pytest.approx(loss_before.item(), rel=1e-12, abs=1e-14)
    assert info["loss_after"] == pytest.approx(loss_after.item(), rel=1e-10)
    assert info["kl_after"] == pytest.approx(kl_after.item(), rel=1e-10)
    assert loss_after < loss_before and 0 < kl_after.item() < max_kl


def test_pretrained_gradient_and_fisher_products_are_plain_trpos():
    """Zero inner steps (lr 0, no second-order term): theta' = theta exactly, so the objective trpo_step differentiates
    is the plain surrogate and its curvature the Hessian of the plain KL, not MAML's through an inner step."""
    params = tiny_params(3)
    train, adv = tiny_round(4)
    batch = pretraining_batch(train, adv)
    objective = MetaObjective(SPEC, params, batch, 0.0, second_order=False)
    theta = flatten(params.values()).requires_grad_(True)
    old = old_policy(params, train)
    loss, _ = plain_trpo(unflatten(theta, params), old, train, adv)
    (grad,) = torch.autograd.grad(loss, theta)
    assert torch.allclose(objective.grad, grad, rtol=1e-10, atol=1e-14)
    hessian = torch.autograd.functional.hessian(
        lambda x: plain_trpo(unflatten(x, params), old, train, adv)[1], theta.detach())
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    products = torch.stack([objective.fisher_vector_product(e) for e in eye], 1)
    assert torch.allclose(products, hessian, rtol=1e-8, atol=1e-12), (products - hessian).abs().max()
    # MAML's objective on the same round (the pre-update round as its validation round too) is another function
    maml = MetaObjective(SPEC, params, batch, 0.3, second_order=True)
    assert (maml.grad - grad).abs().max() > 1e-3


def test_a_pretrained_iteration_samples_one_round_and_takes_its_trpo_step(tmp_path):
    trainer = RLTrainer(dataclasses.replace(TINY, out_dir=str(tmp_path)))
    start = trainer.generator.get_state()
    batch = trainer.sample_meta_batch()
    after_sampling = trainer.generator.get_state()
    assert batch.valid is batch.train
    before = {k: v.clone() for k, v in trainer.params.items()}
    expected, _ = meta_update(trainer.spec, trainer.params, batch, trainer.cfg, trainer.settings)
    trainer.generator.set_state(start)
    record = trainer.step()
    assert torch.equal(trainer.generator.get_state(), after_sampling)  # the step sampled that one round, no more
    assert record["return_pre"] == batch.train.returns().mean().item() and "return_post" not in record
    assert all(torch.equal(trainer.params[k], expected[k]) for k in expected)
    assert any(not torch.equal(trainer.params[k], before[k]) for k in before)
    assert 0 < record["kl_after"] < TINY.max_kl and record["ls_steps"] >= 0
    # the best iterate is chosen by the pre-update return: the policy before this update
    assert trainer.best["return"] == record["return_pre"] and trainer.best["iteration"] == 0
    assert all(torch.equal(trainer.best["params"][k], before[k]) for k in before)


def test_pretrained_resume_continues_exactly_and_refuses_another_algorithm(tmp_path):
    small = dataclasses.replace(TINY, meta_batch=2, trajectories=2, horizon=8, checkpoint_every=1)
    straight = RLTrainer(dataclasses.replace(small, iterations=2, out_dir=str(tmp_path / "a"))).train()
    RLTrainer(dataclasses.replace(small, iterations=1, out_dir=str(tmp_path / "b"))).train()
    resumed = RLTrainer(dataclasses.replace(small, iterations=2, out_dir=str(tmp_path / "b")), resume=True).train()
    assert all(torch.equal(straight.params[k], resumed.params[k]) for k in straight.params)
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    log_a = (tmp_path / "a" / "state" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "state" / "log.jsonl").read_text().splitlines()
    assert [strip(x) for x in log_a] == [strip(x) for x in log_b] and len(log_a) == 2
    maml = dataclasses.replace(small, algorithm="maml", iterations=3, out_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"state at .*state\.pt was trained with --algorithm pretrained, not maml"):
        RLTrainer(maml, resume=True)
    assert small.action_scale == 0.1  # the navigation-2d config's (cbfinn's parameterization)
    unscaled = dataclasses.replace(small, iterations=3, out_dir=str(tmp_path / "b"), action_scale=1.0)
    with pytest.raises(ValueError, match=r"trained with --action_scale 0.1, not 1; resume it with --action_scale 0.1"):
        RLTrainer(unscaled, resume=True)


def test_cli_refuses_a_bad_algorithm_with_exit_code_2(capsys):
    from trainer.__main__ import main

    cfg, _ = rl_config_from_args(["navigation-2d", "--algorithm", "pretrained"])
    assert cfg.algorithm == "pretrained" and RL_CONFIGS["navigation-2d"].algorithm == "maml"
    for argv, message in ((["navigation-2d", "--algorithm", "reptile"],
                           "--algorithm 'reptile', expected maml or pretrained"),
                          (["halfcheetah-dir", "--algorithm", "MAML"],
                           "--algorithm 'MAML', expected maml or pretrained"),
                          (["navigation-2d", "--algorithm", "pretrained", "--first_order", "true"],
                           "--first_order true with --algorithm pretrained, expected false"),
                          (["navigation-2d", "--action_scale", "0"],
                           "--action_scale 0.0, expected a finite value > 0")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


# ---- runs through the CLI, and python -m trainer.rl.evaluate over their policies ----

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny MAML run and a tiny pretrained run, each through `python -m trainer navigation-2d` (in-process)."""
    from trainer.__main__ import main

    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("maml", []), ("pretrained", ["--algorithm", "pretrained"])):
        assert main(["navigation-2d", *TINY_ARGV, *extra, "--out_dir", str(root / name)]) == 0
    return root


def test_cli_pretrained_run_is_written_like_a_maml_run_and_labelled_pretrained(runs):
    run = runs / "pretrained"
    for name in ("results.json", "results.md", "training.png", "meta_test_steps.png", "policy.pt",
                 "state/state.pt", "state/log.jsonl"):
        assert (run / name).is_file(), name
    result = json.loads((run / "results.json").read_text())
    assert list(result["evaluations"]) == ["pretrained (best iterate)", "pretrained (last iterate)",
                                           "random initialization"]
    assert result["config"]["algorithm"] == "pretrained" and "pretrained" in result["sources"]["algorithm"]
    assert "best_train_return_pre" in result["training"] and "best_train_return_post" not in result["training"]
    log = [json.loads(line) for line in (run / "state" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2]
    assert all("return_pre" in r and "return_post" not in r and r["kl_after"] < 0.01 for r in log)
    markdown = (run / "results.md").read_text()
    assert "| pretrained (best iterate) | " in markdown and "| pretrained (last iterate) | " in markdown
    assert "| MAML" not in markdown and "| paper MAML (Finn et al. 2017, Table 4) | -40.41 |" in markdown
    assert "'pretrained' is the paper's baseline" in markdown and PROTOCOL_NOTES["navigation-2d"] in markdown
    assert "--algorithm pretrained" in markdown  # the command
    model = load_policy(run / "policy.pt")
    assert model.provenance["config"]["algorithm"] == "pretrained" and "best_train_return_pre" in model.provenance
    assert "pretrained (best iterate)" in model.provenance["meta_test"]
    # the MAML run of the same settings keeps its labels and has no pretrained note
    maml = (runs / "maml" / "results.md").read_text()
    assert "| MAML (best iterate) | " in maml and "pretrained" not in maml


def test_evaluate_cli_tabulates_saved_policies_with_their_runs_numbers(runs, tmp_path, capsys):
    maml, pre = runs / "maml" / "policy.pt", runs / "pretrained" / "policy.pt"
    out = tmp_path / "compare"
    argv = [str(maml), str(pre), "--random", "--out", str(out)]
    assert ev.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    labels = [f"MAML (best iterate, {maml})", f"pretrained (best iterate, {pre})", "random initialization"]
    assert list(result["evaluations"]) == labels
    assert result["protocol"] == {"env": "navigation-2d", "horizon": 10, "tasks": 3, "trajectories": 2, "steps": 3,
                                  "lrs": [0.1, 0.05, 0.05], "seed": ev.TEST_SEED, "from": str(maml)}
    # the same test goals, noise and steps as each run's own final evaluation: exactly its numbers
    own_maml = json.loads((runs / "maml" / "results.json").read_text())["evaluations"]
    own_pre = json.loads((runs / "pretrained" / "results.json").read_text())["evaluations"]
    for label, own in zip(labels, (own_maml["MAML (best iterate)"], own_pre["pretrained (best iterate)"],
                                   own_maml["random initialization"])):
        got = result["evaluations"][label]
        assert (got["mean"], got["ci95"], got["per_task"]) == (own["mean"], own["ci95"], own["per_task"]), label
    assert result["evaluations"]["random initialization"] == own_pre["random initialization"]
    markdown = (out / "results.md").read_text()
    for label in labels:
        assert f"| {label} | " in markdown
    assert "| paper MAML (Finn et al. 2017, Table 4) | -40.41 | -11.68 | -3.33 | -3.23 |" in markdown
    assert markdown.count("the same numbers as its run's own meta-test") == 2
    assert "'pretrained' is the paper's baseline" in markdown and PROTOCOL_NOTES["navigation-2d"] in markdown
    assert result["command"] == "python -m trainer.rl.evaluate " + " ".join(argv) and result["command"] in markdown
    assert (out / "meta_test_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out / "results.json") in capsys.readouterr().out
    # another protocol from the options: fewer goals and steps, so no longer the runs' own numbers
    assert ev.main([str(pre), str(maml), "--tasks", "2", "--trajectories", "3", "--steps", "1",
                    "--out", str(tmp_path / "short")]) == 0
    short = json.loads((tmp_path / "short" / "results.json").read_text())
    assert list(short["evaluations"]) == labels[1::-1]
    assert all(len(r["mean"]) == 2 and len(r["per_task"][0]) == 2 for r in short["evaluations"].values())
    assert short["protocol"]["lrs"] == [0.1] and "its run's own" not in (tmp_path / "short" / "results.md").read_text()


def test_evaluate_cli_notices_a_policy_whose_run_used_another_protocol(runs, tmp_path, capsys):
    maml = runs / "maml" / "policy.pt"
    model = load_policy(runs / "pretrained" / "policy.pt")
    model.provenance["config"]["horizon"] = 12
    other = save_policy(tmp_path / "h12" / "policy.pt", model)
    assert ev.main([str(maml), str(other), "--out", str(tmp_path / "out")]) == 0
    notice = (f"{other}'s run used --horizon 12, {maml}'s 10: every policy is evaluated with 10 (the first policy's "
              "run's, or the option)")
    assert f"NOTICE: {notice}" in capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["notices"] == [notice] and f"NOTICE: {notice}" in (tmp_path / "out" / "results.md").read_text()
    assert result["policies"][f"MAML (best iterate, {maml})"]["reproduces_run"] is True
    assert "reproduces_run" not in result["policies"][f"pretrained (best iterate, {other})"]  # its run: horizon 12


def test_evaluate_cli_errors_name_the_file_and_what_was_expected(runs, tmp_path, capsys):
    maml = runs / "maml" / "policy.pt"
    cheetah_spec = PolicySpec("halfcheetah-vel", "halfcheetah-vel", 17, 6, hidden=(8, 8), action_low=-1.0,
                              action_high=1.0)
    cheetah = save_policy(tmp_path / "cheetah.pt", PolicyModel(cheetah_spec, init_policy(cheetah_spec)))
    cases = (([str(tmp_path / "nope.pt")], f"POLICY {tmp_path / 'nope.pt'}: no such policy checkpoint file"),
             ([str(maml), str(maml)], f"POLICY {maml} given twice, expected each policy once"),
             ([str(maml), str(cheetah)], f"POLICY {cheetah}: environment 'halfcheetah-vel' (17 -> 6), expected "
                                         "'navigation-2d' (2 -> 2)"),
             ([str(maml), "--tasks", "0"], "--tasks 0, expected >= 1"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            ev.main([*argv, "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "out").exists()


# ---- the paper's row and the protocol per environment ----

def fake_result(name: str, algorithm: str = "maml") -> dict:
    cfg = dataclasses.asdict(dataclasses.replace(RL_CONFIGS[name], algorithm=algorithm))
    label = "MAML" if algorithm == "maml" else "pretrained"
    return {"config": cfg, "paper": PAPER[name], "lrs": [0.1, 0.05, 0.05], "hardware": "2-core test CPU",
            "command": f"python -m trainer {name}",
            "evaluations": {f"{label} (best iterate)": {"mean": [-1.0, -2.0, -3.0, -4.0], "ci95": [0.5] * 4}},
            "training": {"iterations": 3, "train_seconds": 9.0, "seconds_per_iteration": 3.0, "threads": 1,
                         "selected": "best", "evaluated_iteration": 2}}


def test_cheetah_results_label_the_figure_5_row_and_print_their_own_protocol(tmp_path):
    navigation_only = ("Table 4", "-40.41", "[-0.1, 0.1]", "point env", "goals (95% CI over goals)")
    figure_row = "| paper MAML (Finn et al. 2017, Fig. 5, read off, approximate) |"
    vel = results_markdown(fake_result("halfcheetah-vel"))
    assert f"{figure_row} ≈ -140 to -130 | ≈ -80 to -70 | ≈ -75 to -55 | ≈ -75 to -55 |" in vel
    assert PROTOCOL_NOTES["halfcheetah-vel"] in vel and "goal velocity ~ U[0, 2]" in vel
    assert "HalfCheetah-v5" in vel and "read off its Figure 5" in vel and "oracle about -60" in vel
    direc = results_markdown(fake_result("halfcheetah-dir", "pretrained"))
    assert f"{figure_row} ≈ 0 | ≈ 300 | ≈ 300 to 400 | ≈ 300 to 400 |" in direc
    assert "direction +1 or -1" in direc and "oracle about 400" in direc and "'pretrained' is the paper's" in direc
    for markdown in (vel, direc):
        assert not [text for text in navigation_only if text in markdown]
    nav = results_markdown(fake_result("navigation-2d"))
    assert "| paper MAML (Finn et al. 2017, Table 4) | -40.41 | -11.68 | -3.33 | -3.23 |" in nav
    assert PROTOCOL_NOTES["navigation-2d"] in nav and "HalfCheetah" not in nav and "Figure 5" not in nav
    png = tmp_path / "steps.png"
    paper = paper_curves(PAPER["halfcheetah-dir"])
    assert paper == {"paper MAML (approximate, Fig. 5)": {"mean": [0.0, 300.0, 350.0, 350.0], "low": [0.0, 300.0,
                     300.0, 300.0], "high": [0.0, 300.0, 400.0, 400.0]}}
    assert list(paper_curves(PAPER["navigation-2d"])) == ["paper MAML"] and paper_curves(None) == {}
    plot_rl_steps({"MAML": {"mean": [0, 1, 2, 3], "ci95": [1] * 4}, **paper}, "halfcheetah-dir meta-test", png, 40)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_navigation_results_render_unchanged():
    """results.json files written before the per-environment rows (no paper label) still give their results.md."""
    run = ROOT / "docs" / "results" / "navigation-2d"
    assert results_markdown(json.loads((run / "results.json").read_text())) == (run / "results.md").read_text()
