"""Proto-MAML's head (spec.head_init 'proto'): adapt starts the head at the support prototypes of the body's features.

Checked against an independent nearest-centroid classifier (torch.cdist on the features), and for what the recipe
promises: the meta-gradient reaches the body through the prototypes, the meta head is unused, a step-by-step
evaluation equals one adapt call, old specs load as 'meta', and bad combinations are refused naming the value.
"""

import pytest
import torch

from models.checkpoint import MetaModel, load_checkpoint, save_checkpoint
from models.functional import adapted_keys, body_features, head_logits, init_params, stack_params, stats_shapes
from models.maml import adapt, predict, predict_features, prototype_head
from models.spec import ModelSpec
from trainer.evaluate import evaluate

SPEC = ModelSpec("tiny-proto", "conv4-omniglot", ways=4, inner_lr=0.3, steps=2, hidden=8, input_shape=(1, 12, 12),
                 adapt_params="head", head_init="proto")
HEAD = adapted_keys(SPEC, "head")


def _tasks(tasks=3, shots=2, queries=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, SPEC.ways * shots, 1, 12, 12, generator=g)
    sy = torch.stack([torch.randperm(SPEC.ways, generator=g).repeat(shots) for _ in range(tasks)])
    qx = torch.rand(tasks, queries, 1, 12, 12, generator=g)
    return sx, sy, qx


def _params(seed=1):
    return init_params(SPEC, torch.Generator().manual_seed(seed))


def test_zero_steps_is_euclidean_nearest_centroid_on_the_body_features():
    params, (sx, sy, qx) = _params(), _tasks()
    fast = adapt(SPEC, params, sx, sy, 0, SPEC.inner_lr, adapt_keys=HEAD).params
    body = stack_params(params, sx.shape[0])
    feats = body_features(SPEC, body, sx)
    mu = torch.stack([torch.stack([feats[t][sy[t] == c].mean(0) for c in range(SPEC.ways)])
                      for t in range(sx.shape[0])])
    torch.testing.assert_close(fast["head.weight"], 2 * mu)
    torch.testing.assert_close(fast["head.bias"], -(mu ** 2).sum(-1))
    logits = predict(SPEC, fast, qx, bn_policy="transductive")
    fq = body_features(SPEC, body, qx)
    # logit_c = -|f - mu_c|^2 + |f|^2: the same ranking as the nearest centroid, and the same differences
    want = -torch.cdist(fq, mu) ** 2
    torch.testing.assert_close(logits - logits[..., :1], want - want[..., :1], atol=1e-4, rtol=1e-4)
    assert torch.equal(logits.argmax(-1), want.argmax(-1))


def test_the_meta_head_is_not_used_and_other_keywords_override_the_spec():
    params, (sx, sy, _) = _params(), _tasks()
    other = {**params, "head.weight": params["head.weight"] + 5.0, "head.bias": params["head.bias"] - 3.0}
    a = adapt(SPEC, params, sx, sy, 2, SPEC.inner_lr, adapt_keys=HEAD).params
    b = adapt(SPEC, other, sx, sy, 2, SPEC.inner_lr, adapt_keys=HEAD).params
    torch.testing.assert_close(a["head.weight"], b["head.weight"])
    meta = adapt(SPEC, params, sx, sy, 0, SPEC.inner_lr, adapt_keys=HEAD, head_init="meta").params
    assert torch.equal(meta["head.weight"], params["head.weight"].expand_as(meta["head.weight"]))


def test_the_meta_gradient_reaches_the_body_through_the_prototypes_and_not_the_head():
    params = {k: v.requires_grad_(True) for k, v in _params().items()}
    sx, sy, qx = _tasks()
    qy = torch.randint(0, SPEC.ways, qx.shape[:2], generator=torch.Generator().manual_seed(3))
    fast = adapt(SPEC, params, sx, sy, 1, SPEC.inner_lr, adapt_keys=HEAD, second_order=True).params
    loss = torch.nn.functional.cross_entropy(predict(SPEC, fast, qx, bn_policy="transductive").reshape(-1, SPEC.ways),
                                             qy.reshape(-1))
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    named = dict(zip(params, grads))
    assert named["head.weight"] is None and named["head.bias"] is None
    for k in ("conv0.weight", "conv3.weight", "bn3.bias"):
        assert named[k] is not None and named[k].abs().sum() > 0, k


def test_a_step_by_step_evaluation_equals_one_adapt_call_per_step_count():
    params = _params()
    sx, sy, qx = _tasks(tasks=4, shots=1, queries=2, seed=5)
    qy = torch.randint(0, SPEC.ways, (4, 2), generator=torch.Generator().manual_seed(6))

    class One:  # a sampler that always returns this batch
        def sample(self, n):
            from types import SimpleNamespace

            return SimpleNamespace(support_x=sx[:n], support_y=sy[:n], query_x=qx[:n], query_y=qy[:n])

    result = evaluate(SPEC, params, One(), 4, 3, SPEC.inner_lr, chunk=4, adapt_keys=HEAD)
    for steps in range(4):
        fast = adapt(SPEC, params, sx, sy, steps, SPEC.inner_lr, adapt_keys=HEAD).params
        out = predict(SPEC, fast, qx, bn_policy="transductive")
        acc = ((out.argmax(-1) == qy).float().mean(1) * 100).mean().item()
        assert result["transductive"]["mean"][steps] == pytest.approx(acc), steps


@pytest.mark.parametrize("policy", ["transductive", "support", "running"])
def test_predict_is_the_head_on_predict_features_to_the_bit(policy):
    # what the evaluation's per-step head on once-forwarded query features relies on (trainer.evaluate)
    params, (sx, sy, qx) = _params(), _tasks()
    running = {k: torch.rand(2, *shape, generator=torch.Generator().manual_seed(3)) + 0.5
               for k, shape in stats_shapes(SPEC).items()}
    fast = adapt(SPEC, params, sx, sy, 2, SPEC.inner_lr, adapt_keys=HEAD).params
    want = predict(SPEC, fast, qx, sx, bn_policy=policy, bn_running=running)
    features, skip = predict_features(SPEC, fast, qx, sx, bn_policy=policy, bn_running=running)
    assert skip == (sx.shape[1] if policy == "support" else 0) and features.shape[1] == qx.shape[1] + skip
    assert torch.equal(head_logits(fast, features)[:, skip:], want)
    other = adapt(SPEC, params, sx, sy, 0, SPEC.inner_lr, adapt_keys=HEAD).params  # another head, the same body
    again, _ = predict_features(SPEC, other, qx, sx, bn_policy=policy, bn_running=running)
    assert torch.equal(again, features)


def test_a_class_without_support_rows_gets_a_zero_prototype_and_nothing_non_finite():
    feats = torch.randn(1, 3, 5)
    head = prototype_head(feats, torch.tensor([[0, 0, 2]]), 3)
    assert torch.equal(head["head.weight"][0, 1], torch.zeros(5)) and head["head.bias"][0, 1] == 0
    assert all(torch.isfinite(v).all() for v in head.values())


def test_the_spec_round_trips_and_old_specs_are_meta():
    d = SPEC.to_dict()
    assert ModelSpec.from_dict(d).head_init == "proto"
    d.pop("head_init")
    assert ModelSpec.from_dict(d).head_init == "meta"


def test_a_checkpoint_keeps_head_init(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", MetaModel(SPEC, _params()))
    assert load_checkpoint(path).spec.head_init == "proto"


@pytest.mark.parametrize("changes,needle", [
    (dict(head_init="cosine"), "head_init 'cosine'"),
    (dict(head_init="proto", adapt_params="all"), "adapt_params 'all'"),
])
def test_bad_head_init_combinations_are_refused_naming_the_value(changes, needle):
    with pytest.raises(ValueError, match=needle):
        SPEC.with_(**changes)
