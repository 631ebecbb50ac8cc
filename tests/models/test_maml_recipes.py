"""adapt()'s recipe options against the plain inner loop: head-only adaptation (ANIL), per-step rates (LSLR), the
trajectory; and checkpoints that carry them (old checkpoints still load)."""

import pytest
import torch

from models.checkpoint import CheckpointError, MetaModel, load_checkpoint, save_checkpoint
from models.functional import HEAD_KEYS, adapted_keys, init_params
from models.maml import adapt, predict
from models.spec import ModelSpec
from tests.models.test_functional import SPECS
from tests.models.test_maml import tasks_for

SPEC = SPECS["conv4-omniglot"]


def meta_init(spec=SPEC, seed=0, requires_grad=False):
    params = init_params(spec, torch.Generator().manual_seed(seed))
    return {k: v.requires_grad_(requires_grad) for k, v in params.items()}


def per_element(meta, rate_of):
    """Meta-SGD-style per-element rates (the original adapt path), one value per parameter tensor."""
    return {k: torch.full_like(v, rate_of(k)) for k, v in meta.items()}


def test_lslr_with_one_step_equals_meta_sgd_per_layer_rates():
    meta = meta_init()
    x, y = tasks_for(SPEC, tasks=3, shots=1)
    rates = {k: 0.05 + 0.01 * i for i, k in enumerate(meta)}
    ours = adapt(SPEC, meta, x, y, 1, 0.4, step_lrs={k: torch.tensor([r]) for k, r in rates.items()}).params
    reference = adapt(SPEC, meta, x, y, 1, per_element(meta, rates.get)).params
    for k in meta:
        torch.testing.assert_close(ours[k], reference[k], atol=1e-6, rtol=1e-5)


def test_lslr_uses_each_steps_own_rate_and_the_last_beyond_them():
    meta = meta_init()
    x, y = tasks_for(SPEC, tasks=2, shots=1)
    step_lrs = {k: torch.tensor([0.1, 0.02]) for k in meta}
    ours = adapt(SPEC, meta, x, y, 3, 0.4, step_lrs=step_lrs).params
    fast = adapt(SPEC, meta, x, y, 1, 0.1).params  # the plain loop, one step at a time
    fast = adapt(SPEC, fast, x, y, 1, 0.02).params
    fast = adapt(SPEC, fast, x, y, 1, 0.02).params
    for k in meta:
        torch.testing.assert_close(ours[k], fast[k], atol=1e-6, rtol=1e-5)


def test_recipe_path_with_every_parameter_equals_the_plain_loop():
    meta = meta_init(requires_grad=True)
    x, y = tasks_for(SPEC, tasks=2, shots=1)
    plain = adapt(SPEC, meta, x, y, 2, 0.3, second_order=True, track=True)
    recipe = adapt(SPEC, meta, x, y, 2, 0.3, second_order=True, track=True, adapt_keys=tuple(meta),
                   keep_trajectory=True)
    for k in meta:
        torch.testing.assert_close(recipe.params[k], plain.params[k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(recipe.trajectory[-1][k], plain.params[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(recipe.support_loss, plain.support_loss)
    assert len(recipe.trajectory) == 2
    one = adapt(SPEC, meta, x, y, 1, 0.3, second_order=True).params
    torch.testing.assert_close(recipe.trajectory[0]["conv0.weight"], one["conv0.weight"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["conv4-omniglot", "mlp-omniglot"])
def test_anil_adapt_equals_full_adapt_with_zero_body_rates(arch):
    spec = SPECS[arch]
    meta = meta_init(spec)
    x, y = tasks_for(spec, tasks=3, shots=2)
    anil = adapt(spec, meta, x, y, 3, 0.2, adapt_keys=HEAD_KEYS, track=True)
    reference = adapt(spec, meta, x, y, 3, per_element(meta, lambda k: 0.2 if k in HEAD_KEYS else 0.0), track=True)
    for k in meta:
        torch.testing.assert_close(anil.params[k], reference.params[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(anil.support_loss, reference.support_loss, atol=1e-5, rtol=1e-5)
    assert not torch.equal(anil.params["head.weight"][0], meta["head.weight"])  # the head did move


def test_anil_body_gets_the_second_order_meta_gradient_of_full_maml_with_zero_body_rates():
    meta = meta_init(requires_grad=True)
    x, y = tasks_for(SPEC, tasks=2, shots=1)
    qx, qy = tasks_for(SPEC, tasks=2, shots=1, seed=1)

    def meta_grads(**kw):
        fast = adapt(SPEC, meta, x, y, 2, second_order=True, **kw).params
        loss = torch.nn.functional.cross_entropy(predict(SPEC, fast, qx, bn_policy="transductive").flatten(0, 1),
                                                 qy.flatten())
        return torch.autograd.grad(loss, list(meta.values()))

    anil = meta_grads(lr=0.2, adapt_keys=HEAD_KEYS)
    reference = meta_grads(lr=per_element(meta, lambda k: 0.2 if k in HEAD_KEYS else 0.0))
    for k, a, b in zip(meta, anil, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=k)
        assert a.abs().sum() > 0, f"{k} got no meta-gradient"


def test_serving_adapt_leaves_the_meta_init_alone_and_rejects_unknown_keys():
    meta = meta_init()
    before = {k: v.clone() for k, v in meta.items()}
    x, y = tasks_for(SPEC, tasks=2, shots=1)
    fast = adapt(SPEC, meta, x, y, 2, 0.4, adapt_keys=HEAD_KEYS).params
    for k in meta:
        assert torch.equal(meta[k], before[k])
        assert fast[k].shape == (2, *meta[k].shape) and fast[k].is_contiguous()
        if k not in HEAD_KEYS:
            assert torch.equal(fast[k][1], meta[k])
    with pytest.raises(ValueError, match="adapt_keys.*expected a non-empty subset"):
        adapt(SPEC, meta, x, y, 1, 0.4, adapt_keys=("conv9.weight",))
    with pytest.raises(ValueError, match=r"step_lrs\['head.bias'\] has shape \[2, 1\], expected \[steps\]"):
        adapt(SPEC, meta, x, y, 1, 0.4, step_lrs={"head.bias": torch.ones(2, 1)})


def test_adapted_keys():
    assert adapted_keys(SPEC, "all") == tuple(meta_init())
    assert adapted_keys(SPEC, "head") == HEAD_KEYS
    no_bn = adapted_keys(SPEC, "no-bn")
    assert "conv0.weight" in no_bn and "head.bias" in no_bn and not any(k.startswith("bn") for k in no_bn)
    with pytest.raises(ValueError, match="adapt_params 'body'.*expected one of"):
        adapted_keys(SPEC, "body")


def test_checkpoint_carries_step_lrs_and_adapt_params(tmp_path):
    spec = ModelSpec(name="x", arch="conv4-omniglot", ways=5, inner_lr=0.4, steps=2, hidden=8, adapt_params="head")
    params = init_params(spec, torch.Generator().manual_seed(0))
    step_lrs = {k: torch.tensor([0.3, 0.2]) for k in HEAD_KEYS}
    save_checkpoint(tmp_path / "a.pt", MetaModel(spec, params, step_lrs=step_lrs))
    model = load_checkpoint(tmp_path / "a.pt")
    assert model.spec.adapt_params == "head"
    assert model.step_lrs.keys() == step_lrs.keys() and torch.equal(model.step_lrs["head.bias"], step_lrs["head.bias"])
    save_checkpoint(tmp_path / "b.pt", MetaModel(spec, params, step_lrs={"head.bias": torch.tensor([float("nan")])}))
    with pytest.raises(CheckpointError, match="b.pt: 'step_lrs.head.bias' holds NaN"):
        load_checkpoint(tmp_path / "b.pt")
    save_checkpoint(tmp_path / "c.pt", MetaModel(spec, params, step_lrs={"fc9.bias": torch.tensor([0.1])}))
    with pytest.raises(CheckpointError, match="c.pt: 'step_lrs.fc9.bias' names no parameter"):
        load_checkpoint(tmp_path / "c.pt")


def test_a_checkpoint_written_before_the_recipes_still_loads(tmp_path):
    """The format the bundled models were written in: no step_lrs entry, a spec without adapt_params."""
    spec = ModelSpec(name="old", arch="conv4-omniglot", ways=5, inner_lr=0.4, steps=1, hidden=8)
    d = spec.to_dict()
    del d["adapt_params"]
    payload = {"format": "fastadapt-checkpoint", "format_version": 1, "spec": d,
               "params": init_params(spec, torch.Generator().manual_seed(0)), "inner_lrs": None, "provenance": {}}
    torch.save(payload, tmp_path / "old.pt")
    model = load_checkpoint(tmp_path / "old.pt")
    assert model.spec.adapt_params == "all" and model.step_lrs is None
