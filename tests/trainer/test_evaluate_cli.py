"""`python -m trainer.evaluate CHECKPOINT`: meta-test any checkpoint (in-process main([...]), tiny hidden=8 models)."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from models.checkpoint import MetaModel, save_checkpoint
from models.functional import adapted_keys, init_params
from models.spec import ModelSpec
from trainer import evaluate as ev
from trainer.config import CONFIGS
from trainer.data.omniglot import load_omniglot, split_info
from trainer.train import TEST_SEED, build_samplers

ROOT = Path(__file__).resolve().parents[2]


def fresh_checkpoint(path, ways=5, provenance=None, **spec_kw):
    spec = ModelSpec(f"tiny-{ways}w1s", "conv4-omniglot", ways=ways, inner_lr=0.4, steps=3, hidden=8, **spec_kw)
    params = init_params(spec, torch.Generator().manual_seed(0))
    step_lrs = None
    if spec.adapt_params == "head":  # an ANIL + LSLR recipe: per-step rates of the head only
        step_lrs = {k: torch.tensor([0.5, 0.2, 0.1]) for k in adapted_keys(spec, "head")}
    return save_checkpoint(path, MetaModel(spec, params, provenance=provenance or {}, step_lrs=step_lrs))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fresh_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.mark.parametrize("within", [False, True])
def test_writes_json_markdown_and_png(tiny, tmp_path, omniglot_root, within, capsys):
    out = tmp_path / "out"
    argv = [str(tiny), "--tasks", "20", "--steps", "2", "--out", str(out), "--device", "cpu",
            "--data-root", str(omniglot_root), *(["--within-alphabet"] if within else [])]
    assert ev.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["tasks"] == 20 and result["metric"] == "accuracy_percent"
    assert result["within_alphabet"] is within and result["task_kind"] == ("within-alphabet" if within else "random")
    assert (result["ways"], result["shots"], result["queries"], result["steps"]) == (5, 1, 1, 2)
    assert result["seed"] == TEST_SEED and result["report_step"] == 3 and result["checkpoint"] == str(tiny)
    for policy in ("transductive", "support"):
        mean, ci = result[policy]["mean"], result[policy]["ci95"]
        assert len(mean) == len(ci) == 3  # steps 0, 1, 2
        assert all(0 <= m <= 100 for m in mean) and all(c > 0 for c in ci), result[policy]
    # a fresh initialization records no split: the default, background -> images_evaluation (659 characters)
    data = result["data"]
    assert data["split"] == "background" and data["test_classes"] == 659 and "default" in data["source"]
    if within:
        assert len(data["within_alphabet"]["alphabets"]) == 20 and data["within_alphabet"]["skipped"] == {}
    markdown = (out / "results.md").read_text()
    assert result["command"] == "python -m trainer.evaluate " + " ".join(argv) and result["command"] in markdown
    assert f"Checkpoint: `{tiny}`" in markdown and f"{result['task_kind']} tasks" in markdown
    assert result["hardware"]["cpu"] in markdown and "| inner steps | transductive | support |" in markdown
    assert f"| 2 | {result['transductive']['mean'][2]:.2f} ± " in markdown
    assert (out / "meta_test_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out / "results.json") in capsys.readouterr().out


def test_random_tasks_reproduce_the_trainers_meta_test_with_the_checkpoints_recipe(tmp_path, omniglot_root):
    """A checkpoint whose provenance is the trainer's (config + split) and whose recipe is ANIL + LSLR: the CLI's
    defaults (seed, chunk, queries) and recipe give exactly what trainer/__main__.py final_evaluation computes."""
    cfg = dataclasses.replace(CONFIGS["omniglot-5w1s"], hidden=8, adapt_params="head", lslr=True, eval_chunk=8,
                              data_root=str(omniglot_root))
    data = load_omniglot(omniglot_root)
    provenance = {"config": dataclasses.asdict(cfg), "split": split_info(data, cfg.split, 0, cfg.val_classes),
                  "iterations": 7, "train_seconds": 1.5, "device": "cpu"}
    path = fresh_checkpoint(tmp_path / "anil.pt", provenance=provenance, adapt_params="head")
    out = tmp_path / "out"
    assert ev.main([str(path), "--tasks", "20", "--steps", "3", "--out", str(out), "--device", "cpu",
                    "--data-root", str(omniglot_root)]) == 0
    got = json.loads((out / "results.json").read_text())
    assert got["chunk"] == 8 and got["data"]["source"] == "the checkpoint's provenance" and got["notices"] == []
    assert got["recipe"] == {"adapt_params": "head", "head_init": "meta", "support_views": "none",
                             "query_views": "none", "lr": "LSLR per step"}
    assert got["iterations"] == 7
    from models.checkpoint import load_checkpoint

    model = load_checkpoint(path)
    test = build_samplers(cfg, torch.device("cpu"))[0]["test"]
    want = ev.evaluate(model.spec, model.params, test(), 20, 3, model.inner_lr(), cfg.eval_chunk,
                       adapt_keys=adapted_keys(model.spec, "head"), step_lrs=model.step_lrs)
    for policy in ("transductive", "support"):
        assert got[policy]["mean"] == pytest.approx(want[policy]["mean"], abs=1e-9)
    plain = ev.evaluate(model.spec, model.params, test(), 20, 3, model.inner_lr(), cfg.eval_chunk)
    assert plain["support"]["mean"][1:] != want["support"]["mean"][1:]  # the recipe changes the numbers


def test_the_checkpoints_split_is_used_unless_overridden(tmp_path, omniglot_root, capsys):
    data = load_omniglot(omniglot_root)
    path = fresh_checkpoint(tmp_path / "paper.pt", provenance={"split": split_info(data, "paper", 0, 100)})
    common = ["--tasks", "4", "--steps", "1", "--device", "cpu", "--data-root", str(omniglot_root)]
    assert ev.main([str(path), *common, "--within-alphabet", "--out", str(tmp_path / "a")]) == 0
    paper = json.loads((tmp_path / "a" / "results.json").read_text())
    assert paper["data"]["split"] == "paper" and paper["data"]["test_classes"] == 423
    skipped = paper["data"]["within_alphabet"]["skipped"]  # 5-way: the paper test split's alphabets of < 5 chars
    assert skipped and all(n < 5 for n in skipped.values()) and paper["notices"]
    assert "skipped" in capsys.readouterr().err
    assert ev.main([str(path), *common, "--split", "background", "--out", str(tmp_path / "b")]) == 0
    override = json.loads((tmp_path / "b" / "results.json").read_text())
    assert override["data"]["split"] == "background" and override["data"]["source"] == "--split"
    assert any("overrides the checkpoint's paper split" in n for n in override["notices"])
    assert "NOTICE: --split background overrides" in (tmp_path / "b" / "results.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.pt"], "CHECKPOINT missing.pt: no such file"),
        (["{ckpt}", "--tasks", "0"], "--tasks 0: expected an integer >= 1"),
        (["{ckpt}", "--steps", "-1"], "--steps -1: expected an integer >= 0"),
        (["{ckpt}", "--queries", "0"], "--queries 0: expected an integer >= 1"),
        (["{ckpt}", "--ways", "6"], "--ways 6: expected 2..5"),
        (["{ckpt}", "--shots", "15", "--queries", "6"], "15 \\+ 6 = 21 examples per class"),
        (["{ckpt}", "--split", "nonsense"], "invalid choice: 'nonsense'"),
        (["{ckpt}", "--tasks", "many"], "invalid int value: 'many'"),
        (["{ckpt}", "--support-views", "grid"], "invalid choice: 'grid'"),
        (["{bad}"], "not a readable checkpoint"),
        (["{ckpt20}", "--within-alphabet", "--split", "paper"], "no alphabet has ways=20 characters.*has 18"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(tiny, tmp_path, omniglot_root, args, message, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    ckpt20 = fresh_checkpoint(tmp_path / "tiny20.pt", ways=20) if "{ckpt20}" in args else None
    argv = [a.format(ckpt=tiny, bad=bad, ckpt20=ckpt20) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        ev.main([*argv, "--device", "cpu", "--data-root", str(omniglot_root), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_support_views_raise_the_bundled_20_way_models_served_accuracy(tmp_path, omniglot_root):
    """The bundled 20-way 1-shot model on real Omniglot (new alphabets, the meta-test's first 100 tasks): adapting on
    every support image and its 1- and 2-pixel shifts (models.views) answers more queries under the serving policy
    (600 tasks: docs/results/support-views/)."""
    zoo = ROOT / "models" / "zoo" / "omniglot-20w1s.pt"
    got = {}
    for views in ("none", "cross2"):
        out = tmp_path / views
        assert ev.main([str(zoo), "--tasks", "100", "--steps", "0", "--support-views", views, "--device", "cpu",
                        "--data-root", str(omniglot_root), "--out", str(out)]) == 0
        result = json.loads((out / "results.json").read_text())
        assert result["recipe"]["support_views"] == views
        got[views] = result["support"]["mean"][0]
    assert got["cross2"] > got["none"] + 0.3, got
