"""`make demo` and `make loadtest` end to end, shortened (a real server subprocess; the bundled 5-way model and
fresh ones)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from server import demo, loadtest
from server.launch import REPO_ROOT


def test_task_sampler_uses_distinct_drawings_and_covers_every_class():
    characters = {}
    for c in range(30):  # pixel [0, 0, 0] says the character, pixel [0, 0, 1] the drawer
        drawings = np.zeros((20, 1, 28, 28), np.uint8)
        drawings[:, 0, 0, 0], drawings[:, 0, 0, 1] = c, np.arange(20)
        characters[f"a/c{c}"] = drawings
    rng = np.random.default_rng(0)
    sx, sy, qx, qy = demo.sample_task(characters, list(characters), rng, ways=5, shots=2, queries=3)
    assert sx.shape == (10, 1, 28, 28) and qx.shape == (15, 1, 28, 28)
    assert sorted(sy.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and sorted(qy.tolist()) == sorted(list(range(5)) * 3)
    chosen = set()
    for label in range(5):
        drawings = np.concatenate([sx[sy == label], qx[qy == label]])
        assert len(set(drawings[:, 0, 0, 0].tolist())) == 1, "a label must be one character"
        assert len(set(drawings[:, 0, 0, 1].tolist())) == 5, "support and query drawings must be distinct"
        chosen.add(int(drawings[0, 0, 0, 0]))
    assert len(chosen) == 5, "every label must be another character"


def test_within_alphabet_tasks_take_every_character_from_one_alphabet():
    """The demo's within-alphabet tasks group the names by the trainer sampler's alphabet_groups: every task's
    characters share one alphabet, alphabets with fewer than N characters are never drawn."""
    sizes = {"Big": 8, "Mid": 5, "Tiny": 3}
    characters = {f"{a}/c{i}": np.full((20, 1, 28, 28), k * 10 + i, np.uint8)  # pixel value: alphabet, character
                  for k, (a, n) in enumerate(sizes.items()) for i in range(n)}
    names = list(characters)
    groups = demo.alphabet_groups([demo.alphabet_of(n) for n in names], 4)
    assert groups.names == ("Big", "Mid") and groups.skipped == {"Tiny": 3}
    rng, seen = np.random.default_rng(0), set()
    for _ in range(60):
        sx, sy, qx, qy = demo.sample_task(characters, names, rng, ways=4, shots=1, queries=2, groups=groups)
        assert sx.shape == (4, 1, 28, 28) and qx.shape == (8, 1, 28, 28)
        alphabets = {int(v) // 10 for v in sx[:, 0, 0, 0]}
        assert len(alphabets) == 1 and len(set(sx[:, 0, 0, 0].tolist())) == 4, sx[:, 0, 0, 0]
        seen |= alphabets
    assert seen == {0, 1}  # Big and Mid, never Tiny
    # without groups the random tasks are the ones the demo always drew for a seed
    a = demo.sample_task(characters, names, np.random.default_rng(3), ways=4, shots=1, queries=2)
    b = demo.sample_task(characters, names, np.random.default_rng(3), 4, 1, 2, None)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_mean_ci95():
    mean, half = demo.mean_ci95([0.0, 1.0] * 50)
    assert mean == 0.5 and abs(half - 1.96 * np.std([0.0, 1.0] * 50, ddof=1) / 10) < 1e-12


@pytest.mark.slow  # a server process and 13,180 PNGs decoded: ~26 s on the 2-core box
def test_demo_runs_end_to_end_and_the_trained_model_beats_chance(tmp_path, omniglot_root, monkeypatch, capsys):
    """The bundled (trained) 5-way model and a fresh stand-in for the 20-way one; DIR/demo.json and demo.md."""
    monkeypatch.setenv("FASTADAPT_OMNIGLOT", str(omniglot_root))
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(REPO_ROOT / "models" / "zoo" / "omniglot-5w1s.pt", zoo)
    out = tmp_path / "demo"
    argv = ["--model-dir", str(zoo), "--tasks", "4", "--warmup-tasks", "1", "--queries-per-class", "2",
            "--no-progress", "--device", "cpu", "--out", str(out)]
    code = demo.main(argv)
    text = capsys.readouterr().out
    assert code == 0, text
    assert "NOTICE" in text and "FRESH, UNTRAINED" in text and "exit code 0" in text
    result = json.loads((out / "demo.json").read_text())
    assert result["fresh_init"] == ["omniglot-20w1s"] and result["server_exit_code"] == 0
    assert result["command"].endswith(" ".join(argv[-4:])) and result["backend"] == "reference"
    assert result["device"] == "cpu" and result["hardware"]["cpus"] >= 1
    trained, trained_within, fresh, fresh_within = result["results"]  # random, then within-alphabet, per model
    assert [r["model"] for r in result["results"]] == ["omniglot-5w1s"] * 2 + ["omniglot-20w1s"] * 2
    assert [r["task_kind"] for r in result["results"]] == ["random", "within-alphabet"] * 2
    assert all(r["tasks"] == 4 for r in result["results"])
    # 4 tasks x 10 queries: the trained model (~94% on 200 tasks) is far above chance (20%); 2/5 is a wide margin
    assert trained["accuracy"] > 2 / trained["ways"], trained
    # within one alphabet it is harder but still far above chance; images_evaluation's 20 alphabets all have >= 20
    assert trained_within["accuracy"] > 1.5 / trained_within["ways"], trained_within
    assert trained_within["alphabets"] == fresh_within["alphabets"] == 20 and fresh_within["skipped_alphabets"] == {}
    for r in result["results"]:
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p90"] <= r["latency_ms"]["p99"]
    table = (out / "demo.md").read_text()
    assert "| omniglot-5w1s | 5-way 1-shot" in table and "FRESH INIT (untrained)" in table
    assert "| omniglot-5w1s | 5-way 1-shot within-alphabet, " in table
    assert "| omniglot-20w1s | 20-way 1-shot within-alphabet, " in table
    assert result["command"] in table and "backend reference" in table


@pytest.mark.parametrize("module,new", [(demo, "--warmup-tasks"), (loadtest, "--warmup-s")])
def test_warmup_means_the_servers_task_counts_only(module, new, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--warmup", "1"])
    assert exit_info.value.code == 2 and f"--warmup is now {new}" in capsys.readouterr().err


@pytest.mark.slow  # a server process and timed load levels: ~13 s on the 2-core box
def test_loadtest_writes_table_and_json(tmp_path, capsys):
    empty = tmp_path / "zoo"
    empty.mkdir()
    out = tmp_path / "lt"
    code = loadtest.main(["--out", str(out), "--model-dir", str(empty), "--concurrency", "1", "4", "--duration",
                          "0.5", "--warmup-s", "0.3", "--min-requests", "4", "--steps", "1", "--device", "cpu",
                          "--in-process-s", "0.2"])
    assert code == 0, capsys.readouterr().out
    data = json.loads((out / "loadtest.json").read_text())
    assert [level["clients"] for level in data["levels"]] == [1, 4]
    assert all(level["requests"] >= 4 and level["errors"] == 0 for level in data["levels"])
    for level in data["levels"]:  # requests x mean latency / clients cannot exceed the measured window
        lat = level["latency_ms"]
        assert lat["p50"] <= lat["max"] and lat["mean"] <= lat["max"]
        assert level["requests"] * lat["mean"] / 1e3 / level["clients"] <= level["window_s"] + lat["max"] / 1e3
    assert data["meta"]["fresh_init"] and data["meta"]["server_exit_code"] == 0
    table = (out / "loadtest.md").read_text()
    assert "| clients | requests | errors | requests/s | p50 ms |" in table and "\n| 4 | " in table
    for level in data["levels"]:  # the same batches in-process, without gRPC, for the served / in-process ratio
        ip = level["in_process"]
        assert ip["tasks"] == max(1, round(level["mean_batch_tasks"])) and ip["tasks_per_s"] > 0
        # smoke only: the report's own formula, it holds by construction
        assert ip["served_fraction"] == level["requests_per_s"] / ip["tasks_per_s"]
    assert "served / in-process" in table
