"""Checkpoints round-trip, and every kind of bad file is refused with an error naming the file and the problem."""

import pytest
import torch

from models.checkpoint import FORMAT_VERSION, CheckpointError, MetaModel, load_checkpoint, save_checkpoint
from models.functional import init_params
from models.spec import ModelSpec

SPEC = ModelSpec("omniglot-5w1s", "conv4-omniglot", ways=5, inner_lr=0.4, steps=3, hidden=8)


@pytest.fixture
def saved(tmp_path):
    model = MetaModel(SPEC, init_params(SPEC, torch.Generator().manual_seed(0)), provenance={"iterations": 10})
    return save_checkpoint(tmp_path / "m.pt", model), model


def test_round_trip_keeps_spec_tensors_and_provenance(saved):
    path, model = saved
    loaded = load_checkpoint(path)
    assert loaded.spec == SPEC
    assert loaded.provenance == {"iterations": 10}
    assert set(loaded.params) == set(model.params)
    for k in model.params:
        assert torch.equal(loaded.params[k], model.params[k])


def test_meta_sgd_learning_rates_round_trip(tmp_path):
    params = init_params(SPEC)
    lrs = {k: torch.full_like(v, 0.3) for k, v in params.items()}
    path = save_checkpoint(tmp_path / "msgd.pt", MetaModel(SPEC, params, lrs))
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.inner_lrs["conv0.weight"], lrs["conv0.weight"])
    assert loaded.inner_lr() is loaded.inner_lrs
    assert loaded.inner_lr(0.05) == 0.05


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{path.name}: not a readable checkpoint"):
        load_checkpoint(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable checkpoint"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_file_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "fastadapt-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: not a readable checkpoint"):
        load_checkpoint(path)


def _rewrite(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)


def test_wrong_version(saved):
    path, _ = saved
    _rewrite(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match=rf"m.pt: format_version {FORMAT_VERSION + 1}, expected {FORMAT_VERSION}"):
        load_checkpoint(path)


def test_not_a_fastadapt_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="other.pt: not a fastadapt checkpoint"):
        load_checkpoint(path)


def test_wrong_architecture_expected(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match="m.pt: architecture 'conv4-omniglot', expected 'conv4-miniimagenet'"):
        load_checkpoint(path, expect_arch="conv4-miniimagenet")


def test_tensors_that_do_not_fit_the_spec(saved):
    path, model = saved
    # The spec says 20 ways but the head was trained for 5: a mismatched file.
    _rewrite(path, spec=SPEC.with_(ways=20).to_dict())
    with pytest.raises(CheckpointError, match=r"m.pt: 'params.head.weight' has shape \[5, 8\], expected \[20, 8\]"):
        load_checkpoint(path)


def test_missing_tensor(saved):
    path, model = saved
    params = dict(model.params)
    del params["bn2.bias"]
    _rewrite(path, params=params)
    with pytest.raises(CheckpointError, match=r"missing \['bn2.bias'\]"):
        load_checkpoint(path)


def test_non_finite_tensor(saved):
    path, model = saved
    params = dict(model.params)
    params["conv1.weight"] = params["conv1.weight"].clone()
    params["conv1.weight"][0, 0, 0, 0] = float("nan")
    _rewrite(path, params=params)
    with pytest.raises(CheckpointError, match="'params.conv1.weight' holds NaN or Inf"):
        load_checkpoint(path)


def test_save_is_atomic_and_leaves_no_temporary_files(saved):
    path, model = saved
    save_checkpoint(path, model)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]
