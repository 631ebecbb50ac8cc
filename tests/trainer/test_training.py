"""Meta-training end to end on real Omniglot: it learns, it resumes bit-for-bit, it writes its artefacts."""

import dataclasses
import json

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.functional import init_params
from trainer.__main__ import final_evaluation
from trainer.config import CONFIGS
from trainer.evaluate import evaluate
from trainer.train import Trainer


def _cfg(tmp_path, **kw):
    base = dict(device="cpu", progress=False, out_dir=str(tmp_path / "run"), val_classes=20, val_tasks=20,
                eval_tasks=40, eval_steps=3, log_every=5, val_every=10, checkpoint_every=5)
    base.update(kw)
    return dataclasses.replace(CONFIGS["omniglot-5w1s"], **base)


@pytest.mark.slow  # meta-trains on real Omniglot: ~13 s on the 2-core box
def test_a_few_meta_iterations_beat_the_untrained_initialization(tmp_path):
    cfg = _cfg(tmp_path, iterations=40, meta_batch=16, hidden=32, eval_tasks=100, eval_steps=1, meta_lr=3e-3)
    trainer = Trainer(cfg)
    spec = trainer.spec
    untrained = init_params(spec, torch.Generator().manual_seed(cfg.seed))
    before = evaluate(spec, untrained, trainer.samplers["test"](), 100, 1, cfg.inner_lr, 100)
    trainer.train()
    after = evaluate(spec, trainer.learner.params, trainer.samplers["test"](), 100, 1, cfg.inner_lr, 100)
    for policy in ("transductive", "support"):
        gain = after[policy]["mean"][1] - before[policy]["mean"][1]
        margin = after[policy]["ci95"][1] + before[policy]["ci95"][1]
        assert gain > margin, f"{policy}: {before[policy]['mean'][1]:.1f}% -> {after[policy]['mean'][1]:.1f}%"


def test_resume_continues_bit_for_bit(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a", iterations=10, hidden=8, meta_batch=4)).train()
    first = Trainer(_cfg(tmp_path / "b", iterations=5, hidden=8, meta_batch=4)).train()
    assert first.iteration == 5
    resumed = Trainer(_cfg(tmp_path / "b", iterations=10, hidden=8, meta_batch=4), resume=True)
    assert resumed.iteration == 5
    resumed.train()
    for k, v in straight.learner.params.items():
        assert torch.equal(v, resumed.learner.params[k]), k
    log_a = [json.loads(x) for x in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    # The interrupted run also validated when it stopped at iteration 5; the records must otherwise agree.
    assert [r["train_loss"] for r in log_a] == [r["train_loss"] for r in log_b]
    assert strip(log_a)[-1] == strip(log_b)[-1]


def test_a_state_saved_on_another_kind_of_device_resumes_with_a_notice(tmp_path, capsys):
    """A CPU run carried to a GPU session: parameters and Adam state continue exactly, the sampler re-seeds."""
    first = Trainer(_cfg(tmp_path, iterations=5, hidden=8, meta_batch=4)).train()
    path = first.dir / "state.pt"
    state = torch.load(path, weights_only=True)
    state["sampler"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator saves
    torch.save(state, path)
    resumed = Trainer(_cfg(tmp_path, iterations=8, hidden=8, meta_batch=4), resume=True)
    assert "saved on another kind of device" in capsys.readouterr().err
    for k, v in first.learner.params.items():
        assert torch.equal(v, resumed.learner.params[k]), k
    assert resumed.train().iteration == 8


def test_final_evaluation_writes_results_plots_and_provenance(tmp_path):
    trainer = Trainer(_cfg(tmp_path, iterations=10, hidden=8, meta_batch=4)).train()
    result = final_evaluation(trainer)
    run = tmp_path / "run"
    for name in ("results.json", "results.md", "meta_test_steps.png", "training.png", "best.pt", "last.pt"):
        assert (run / name).exists(), name
    assert len(result["support"]["mean"]) == 4 and result["tasks"] == 40
    model = load_checkpoint(run / "best.pt")
    assert model.provenance["meta_test"]["support"]["mean"] == result["support"]["mean"]
    assert model.provenance["split"]["split"] == "background"
    assert model.provenance["iterations"] == 10 and model.spec.bn_policy == "support"


def test_sinusoid_meta_training_lowers_post_adaptation_mse(tmp_path):
    cfg = dataclasses.replace(CONFIGS["sinusoid"], device="cpu", progress=False, iterations=300, val_every=100,
                              out_dir=str(tmp_path / "sin"), eval_tasks=200, eval_steps=1)
    trainer = Trainer(cfg)
    untrained = {k: v.clone() for k, v in trainer.learner.params.items()}
    before = evaluate(trainer.spec, untrained, trainer.samplers["test"](), 200, 1, cfg.inner_lr)
    trainer.train()
    after = evaluate(trainer.spec, trainer.learner.params, trainer.samplers["test"](), 200, 1, cfg.inner_lr)
    assert after["transductive"]["mean"][1] < 0.8 * before["transductive"]["mean"][1]


def test_max_seconds_stops_early_with_a_checkpoint(tmp_path):
    trainer = Trainer(_cfg(tmp_path, iterations=10_000, hidden=8, meta_batch=2, max_seconds=1e-9)).train()
    assert trainer.iteration == 5  # stops at the first log point, checkpointed
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "state.pt").exists()


def test_miniimagenet_config_trains_on_a_ravi_larochelle_folder(tmp_path, monkeypatch):
    """The mini-ImageNet configs work end to end for a user who has the data (a tiny synthetic folder here)."""
    from tests.trainer.test_data_miniimagenet import write_fake_miniimagenet

    root = tmp_path / "mini"
    write_fake_miniimagenet(root, classes=5, per_class=4)
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache"))
    cfg = dataclasses.replace(CONFIGS["miniimagenet-5w1s"], device="cpu", progress=False, data_root=str(root),
                              out_dir=str(tmp_path / "run"), iterations=2, meta_batch=2, queries=2, eval_queries=2,
                              hidden=4, inner_steps=2, log_every=1, val_every=2, val_tasks=2, eval_tasks=2,
                              eval_steps=2)
    trainer = Trainer(cfg).train()
    assert trainer.iteration == 2
    result = final_evaluation(trainer)
    assert len(result["support"]["mean"]) == 3
    model = load_checkpoint(tmp_path / "run" / "best.pt", expect_arch="conv4-miniimagenet")
    assert model.spec.input_shape == (3, 84, 84) and model.spec.steps == 10
