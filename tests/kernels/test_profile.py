"""The adapt profiler (a diagnostic, never a timing assertion): it runs the bench's cases and attributes the time."""

import json

import pytest

from kernels.bench.profile import main


def test_cpu_profile_of_the_reference_writes_a_table_that_adds_up(tmp_path, capsys):
    assert main(["--config", "tiny", "--tasks", "1,2", "--backend", "reference", "--device", "cpu", "--calls", "2",
                 "--top", "5", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "profile.json").read_text())
    assert [p["tasks"] for p in data["points"]] == [1, 2] and data["backend"] == "reference"
    for point in data["points"]:
        names = [r["name"] for r in point["rows"]]
        assert len(names) == 5 and point["rows_total"] > 5
        assert any("convolution" in n for n in names)  # a conv net spends its time in convolutions
        assert point["rows"] == sorted(point["rows"], key=lambda r: -r["us_per_call"])
        # A unit slip (us vs ms) is 1000x; 10x leaves room for profiler overhead and a busy box (not a timing claim).
        assert 0 < point["busy_ms"] <= 10 * point["eager_ms"]
        assert all(r["per_call"] > 0 and 0 < r["share"] <= 1 for r in point["rows"])
    md = (tmp_path / "profile.md").read_text()
    assert "## T = 2" in md and "aten::" in md and md in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [(["--tasks", "0"], "--tasks '0'"), (["--tasks", "1,x"], "--tasks '1,x'"),
                                         (["--calls", "0"], "--calls 0")])
def test_bad_arguments_name_the_value(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "tiny", "--device", "cpu", "--out", str(tmp_path), *args])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_the_profiled_twin_of_a_graph_backend_launches_eagerly():
    from kernels.bench.profile import eager_twin
    from kernels.engine.graph import GraphBackend

    eager = GraphBackend("cpu", capture=False, budget_bytes=123)
    assert eager_twin(eager) is eager
    capturing = GraphBackend("cpu", capture=False, budget_bytes=123)
    capturing.capture = True  # as on a GPU
    twin = eager_twin(capturing)
    assert twin is not capturing and not twin.capture and twin.budget_bytes == 123


def test_precision_is_refused_for_the_reference_backend(tmp_path):
    with pytest.raises(ValueError, match="--precision tf32 is a triton backend option"):
        main(["--config", "tiny", "--backend", "reference", "--device", "cpu", "--precision", "tf32",
              "--out", str(tmp_path)])


@pytest.mark.gpu
def test_cuda_profile_of_the_triton_backend_sees_its_kernels(tmp_path):
    assert main(["--config", "tiny", "--tasks", "1", "--backend", "triton", "--device", "cuda", "--calls", "2",
                 "--out", str(tmp_path)]) == 0
    point = json.loads((tmp_path / "profile.json").read_text())["points"][0]
    names = " ".join(r["name"] for r in point["rows"])
    assert "conv" in names and "head" in names, names  # the fused Triton kernels, not torch's
    assert point["served_ms"] > 0 and point["busy_ms"] > 0
