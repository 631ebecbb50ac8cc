"""MAML-RL training end to end on tiny settings: it learns, resumes exactly, and the CLI writes its results."""

import dataclasses
import json

import pytest
import torch

from models.policy import init_policy, load_policy
from trainer.rl.config import RL_CONFIGS, rl_config_from_args
from trainer.rl.evaluate import evaluate_policy
from trainer.rl.train import RLTrainer

TINY = dataclasses.replace(RL_CONFIGS["navigation-2d"], hidden=16, meta_batch=6, trajectories=6, progress=False,
                           checkpoint_every=1000)


def test_a_few_meta_iterations_beat_the_initialization_after_adaptation(tmp_path, capsys):
    cfg = dataclasses.replace(TINY, iterations=6, out_dir=str(tmp_path))
    trainer = RLTrainer(cfg)
    initial = {k: v.clone() for k, v in trainer.params.items()}
    assert all(torch.equal(initial[k], init_policy(trainer.spec, torch.Generator().manual_seed(0))[k])
               for k in initial)
    trainer.train()
    trained = evaluate_policy(trainer.env, trainer.spec, trainer.params, 10, 1, [0.1], 10)
    untrained = evaluate_policy(trainer.env, trainer.spec, initial, 10, 1, [0.1], 10)
    # seen: about -47 vs -108 (the untrained policy's std-1 noise saturates the 0.1 speed limit in every direction)
    assert trained["mean"][1] > untrained["mean"][1] + 20, (trained["mean"], untrained["mean"])
    log = [json.loads(line) for line in (tmp_path / "state" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == list(range(1, 7))
    assert all(r["kl_after"] < cfg.max_kl for r in log)


def test_resume_continues_the_uninterrupted_run_exactly(tmp_path, capsys):
    small = dataclasses.replace(TINY, hidden=8, meta_batch=2, trajectories=2, horizon=20, checkpoint_every=1)
    straight = RLTrainer(dataclasses.replace(small, iterations=2, out_dir=str(tmp_path / "a"))).train()
    RLTrainer(dataclasses.replace(small, iterations=1, out_dir=str(tmp_path / "b"))).train()
    resumed = RLTrainer(dataclasses.replace(small, iterations=2, out_dir=str(tmp_path / "b")), resume=True).train()
    assert resumed.iteration == 2
    for k in straight.params:
        assert torch.equal(straight.params[k], resumed.params[k]), k
    log_a = (tmp_path / "a" / "state" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "state" / "log.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    assert [strip(x) for x in log_a] == [strip(x) for x in log_b]


def test_resume_without_state_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no training state at .*state\.pt"):
        RLTrainer(dataclasses.replace(TINY, out_dir=str(tmp_path)), resume=True)


def test_cli_trains_evaluates_and_bundles(tmp_path, capsys):
    from trainer.__main__ import main

    zoo = tmp_path / "zoo" / "nav.pt"
    argv = ["navigation-2d", "--iterations", "2", "--hidden", "8", "--meta_batch", "2", "--trajectories", "2",
            "--horizon", "10", "--eval_tasks", "3", "--eval_trajectories", "2", "--progress", "false",
            "--out_dir", str(tmp_path / "run"), "--zoo", str(zoo)]
    assert main(argv) == 0
    run = tmp_path / "run"
    for name in ("results.json", "results.md", "training.png", "meta_test_steps.png", "policy.pt",
                 "state/state.pt", "state/log.jsonl"):
        assert (run / name).is_file(), name
    result = json.loads((run / "results.json").read_text())
    assert set(result["evaluations"]) == {"MAML (best iterate)", "MAML (last iterate)", "random initialization"}
    assert all(len(r["mean"]) == 4 and len(r["ci95"]) == 4 for r in result["evaluations"].values())
    assert result["lrs"] == [0.1, 0.05, 0.05] and result["sources"]["max_kl"].startswith("paper")
    assert "python -m trainer navigation-2d --iterations 2" in (run / "results.md").read_text()
    model = load_policy(zoo)
    assert model.spec.hidden == (8, 8) and model.spec.inner_lr == 0.1 and model.spec.action_high == 0.1
    assert model.provenance["iterations"] == 2 and "MAML (best iterate)" in model.provenance["meta_test"]


def test_cli_overrides_and_their_errors(capsys):
    cfg, args = rl_config_from_args(["navigation-2d", "--meta_batch", "5", "--first-order", "true", "--resume"])
    assert cfg.meta_batch == 5 and cfg.first_order is True and args.resume
    assert RL_CONFIGS["navigation-2d"].meta_batch == 20  # the named config is not modified
    for argv, message in ((["navigation-2d", "--nope", "1"], "unknown config key '--nope'"),
                          (["navigation-2d", "--meta_batch", "0"], "--meta_batch 0, expected >= 1"),
                          (["navigation-2d", "--select", "worst"], "--select 'worst', expected best or last"),
                          (["navigation-2d", "--max_kl"], "overrides are '--key value' pairs")):
        with pytest.raises(SystemExit):
            rl_config_from_args(argv)
        assert message in capsys.readouterr().err
