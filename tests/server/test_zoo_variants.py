"""The bundled 5-shot models (`omniglot-5w5s`, `omniglot-20w5s`) are variants of the 1-shot models (`models.variant`:
the same tensors and head start, 10 head steps by default; docs/results/omniglot-5w5s-from-20w/ and omniglot-20w5s/):
served over loopback on real 5-shot tasks of new Omniglot alphabets, each adapts the head alone for its 10 default
steps and predicts on its query views exactly as the in-process reference does, and answers far above chance.
`omniglot-5w1s` is a 20-way Proto-ANIL body served for 5-way tasks (`--ways 5`:
docs/results/omniglot-5w1s-from-20w/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.functional import HEAD_KEYS
from models.maml import adapt, adaptation_stats, predict
from models.preprocess import preprocess_uint8
from models.views import mean_over_views, query_views, support_views
from server import demo
from tests.server.conftest import ZOO_DIR

RESULTS = ZOO_DIR.parents[1] / "docs" / "results"

VARIANTS = [("omniglot-5w5s", "omniglot-5w1s", 5), ("omniglot-20w5s", "omniglot-20w1s", 20)]


@pytest.fixture(scope="module")
def characters(omniglot_root):
    return demo.load_evaluation_characters(omniglot_root, progress=False)


@pytest.mark.parametrize("name,source,ways", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_a_bundled_5_shot_variant_serves_10_head_steps_as_the_reference(serve_zoo, characters, name, source, ways):
    model = load_checkpoint(ZOO_DIR / f"{name}.pt")
    original = load_checkpoint(ZOO_DIR / f"{source}.pt")
    assert model.spec.ways == ways and model.spec.steps == 10 and model.spec.adapt_params == "head"
    assert model.spec.head_init == original.spec.head_init and model.spec.query_views == "cross2"
    for key, value in original.params.items():  # the same tensors as the 1-shot model it is a variant of
        assert torch.equal(model.params[key], value), key
    client, _ = serve_zoo(name)
    info = client.get_model(name)
    assert info["default_steps"] == 10 and info["adapt_params"] == "head" and info["recipe"] in ("anil", "proto-anil")
    assert info["head_init"] == model.spec.head_init
    assert source in info["provenance"]["variant_of"]

    rng, names, spec = np.random.default_rng(7), list(characters), model.spec
    correct = total = 0
    for task in range(4):
        sx, sy, qx, qy = demo.sample_task(characters, names, rng, ways=ways, shots=5, queries=2)
        adapted, prediction = client.adapt_and_predict(name, sx, sy, qx, keep=False)
        assert adapted.steps == 10
        correct, total = correct + int(np.sum(prediction.labels == qy)), total + len(qy)
        if task == 0:  # the served adaptation is the reference's: 10 steps of the head (from the spec's start)
            x = preprocess_uint8(spec, torch.from_numpy(sx))[None]
            q = preprocess_uint8(spec, torch.from_numpy(qx))[None]
            y = torch.from_numpy(sy.astype(np.int64))[None]
            x, y = support_views(spec.support_views, x, y)  # the model's support views, as the server adapts
            fast = adapt(spec, model.params, x, y, 10, spec.inner_lr, adapt_keys=HEAD_KEYS).params
            with torch.no_grad():
                # each query's logits: the mean over its query views (models.views), as the server predicts
                views = predict(spec, fast, query_views(spec.query_views, q), stats=adaptation_stats(spec, fast, x))
                want = mean_over_views(views, spec.query_view_count)[0].numpy()
            np.testing.assert_allclose(prediction.logits, want, atol=1e-4, rtol=1e-4)
    # the meta-tests measured 99.3 % (5-way) and 98.0 % (20-way) under the serving policy; chance is 20 % / 5 %
    assert correct / total >= 0.9, f"{name}: {correct}/{total} correct on 5-shot tasks of new alphabets"


def test_the_bundled_5_way_model_is_a_20_way_body_with_a_prototype_head():
    """omniglot-5w1s is the 64-filter all-characters 20-way body with a prototype head: the 128-filter body that
    omniglot-20w1s serves changed nothing at 5 ways (docs/results/omniglot-20w1s-wide/served/omniglot-5w1s/)."""
    five, twenty = (load_checkpoint(ZOO_DIR / f"{n}.pt") for n in ("omniglot-5w1s", "omniglot-20w1s"))
    body = load_checkpoint(RESULTS / "omniglot-20w1s-proto-anil-allclasses" / "model.pt")
    assert five.spec == body.spec.with_(name="omniglot-5w1s", ways=5, steps=3, support_views="cross2",
                                        query_views="cross2") and five.spec.head_init == "proto"
    assert five.provenance["variant_of"]["ways"] == 20
    assert five.provenance["iterations"] == body.provenance["iterations"]
    for key, value in body.params.items():  # the body as trained, the head's first 5 rows (never read: proto)
        assert torch.equal(five.params[key], value[:5] if key in HEAD_KEYS else value), key
    wide = load_checkpoint(RESULTS / "omniglot-20w1s-wide-allclasses" / "model.pt")  # the 20-way model's tensors
    assert twenty.spec == wide.spec.with_(support_views="cross2", query_views="cross2") and twenty.spec.hidden == 128
    assert twenty.params.keys() == wide.params.keys()
    assert all(torch.equal(twenty.params[k], wide.params[k]) for k in wide.params)
