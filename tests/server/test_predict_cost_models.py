"""server.predict_cost serves copies of the bundled models with the `support` BN policy: everything else of the
checkpoint (parameters, its recipe: adapted subset, learned per-step rates, provenance) is kept."""

import dataclasses

import torch

import server.predict_cost as predict_cost
from models.checkpoint import load_checkpoint, save_checkpoint


def test_served_copies_change_only_the_bn_policy(tmp_path, monkeypatch):
    zoo = tmp_path / "zoo"
    for name, _ in predict_cost.CASES:  # the bundled models, the 5-way one given LSLR rates and BN transductive
        model = load_checkpoint(predict_cost.ZOO / f"{name}.pt")
        if name == "omniglot-5w1s":
            model = dataclasses.replace(model, spec=model.spec.with_(bn_policy="transductive"),
                                        step_lrs={"head.weight": torch.tensor([0.3, 0.2])})
        save_checkpoint(zoo / f"{name}.pt", model)
    monkeypatch.setattr(predict_cost, "ZOO", zoo)
    names = predict_cost.served_models(tmp_path / "served")
    assert names == [name for name, _ in predict_cost.CASES]
    for name in names:
        bundled, served = load_checkpoint(zoo / f"{name}.pt"), load_checkpoint(tmp_path / "served" / f"{name}.pt")
        assert served.spec == bundled.spec.with_(bn_policy="support")  # adapt_params (ANIL: head) and the rest
        assert served.provenance == bundled.provenance
        for field in ("params", "inner_lrs", "step_lrs", "bn_running"):
            a, b = getattr(bundled, field), getattr(served, field)
            assert (a is None) == (b is None), f"{name}: {field}"
            for k in a or {}:
                assert torch.equal(a[k], b[k]), f"{name} {field}.{k}"
