"""Within-alphabet tasks: TaskSampler(..., alphabets=, within_alphabet=True) and alphabet_groups, on synthetic
arrays whose pixel [0, 0] says the class (as test_data_sampler), and on the real images_evaluation alphabets."""

import numpy as np
import pytest
import torch

from trainer.data.omniglot import alphabet_of, load_omniglot, omniglot_split, omniglot_split_alphabets
from trainer.data.sampler import TaskSampler, alphabet_groups, omniglot_sampler

# 4 alphabets of 6, 2, 5 and 3 classes, interleaved (not contiguous) so the grouping cannot rely on order
SIZES = {"Alpha": 6, "Beta": 2, "Gamma": 5, "Delta": 3}
LABELS = [name for i in range(max(SIZES.values())) for name, size in SIZES.items() if i < size]


def tagged(n_classes: int = len(LABELS), per_class: int = 8) -> np.ndarray:
    images = np.random.default_rng(0).integers(0, 256, (n_classes, per_class, 4, 4), dtype=np.uint8)
    images[:, :, 0, 0] = np.arange(n_classes)[:, None]  # the class
    images[:, :, 0, 1] = np.arange(per_class)[None, :]  # the example
    return images


def test_alphabet_groups_keeps_the_alphabets_with_enough_classes():
    groups = alphabet_groups(LABELS, ways=3)
    assert groups.names == ("Alpha", "Delta", "Gamma") and groups.skipped == {"Beta": 2}
    for name, members in zip(groups.names, groups.members):
        assert sorted(LABELS[i] for i in members) == [name] * SIZES[name]
    assert "Beta (2)" in groups.notice() and "1 alphabet(s) with fewer than 3 characters" in groups.notice()
    assert alphabet_groups(LABELS, ways=2).skipped == {} and alphabet_groups(LABELS, ways=2).notice() == ""


def test_every_task_draws_its_classes_from_one_alphabet_and_skips_small_ones():
    images = tagged()
    sampler = TaskSampler(images, ways=4, shots=2, queries=3, seed=1, alphabets=LABELS, within_alphabet=True)
    assert sampler.alphabet_names == ("Alpha", "Gamma") and sampler.skipped_alphabets == {"Beta": 2, "Delta": 3}
    batch = sampler.sample(400)
    drawn = set()
    for t in range(batch.num_tasks):
        classes = batch.classes[t].tolist()
        alphabets = {LABELS[c] for c in classes}
        assert len(set(classes)) == 4 and len(alphabets) == 1, (t, classes)
        assert alphabets == {sampler.alphabet_names[batch.alphabet[t]]}
        drawn |= alphabets
        # the pixels are those of the recorded classes: label j's support images carry class classes[j]
        tags = batch.support_x[t, :, 0, 0, 0].mul(255).round().long().view(4, 2)
        assert (tags == batch.classes[t][:, None]).all()
    assert drawn == {"Alpha", "Gamma"}  # Beta (2) and Delta (3) have fewer than 4 characters: never drawn
    # every class of an eligible alphabet is reached, alphabets about uniformly (200 tasks each expected)
    assert set(batch.classes.flatten().tolist()) == {i for i, a in enumerate(LABELS) if a in ("Alpha", "Gamma")}
    share = (batch.alphabet == 0).float().mean().item()
    assert 0.4 < share < 0.6
    assert "within 2 alphabets" in repr(sampler)


def test_within_alphabet_is_deterministic_per_seed_and_leaves_random_tasks_alone():
    images = tagged()
    make = lambda seed, **kw: TaskSampler(images, 3, 1, 2, seed=seed, alphabets=LABELS, **kw)  # noqa: E731
    a, b, c = make(5, within_alphabet=True).sample(32), make(5, within_alphabet=True).sample(32), \
        make(6, within_alphabet=True).sample(32)
    for name in ("support_x", "query_x", "classes", "support_index", "query_index", "alphabet"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.classes, c.classes)
    # labels but within_alphabet=False: exactly the random tasks of a sampler without labels (recorded runs hold)
    plain, labelled = TaskSampler(images, 3, 1, 2, seed=5).sample(32), make(5).sample(32)
    assert torch.equal(plain.classes, labelled.classes) and torch.equal(plain.support_x, labelled.support_x)
    assert labelled.alphabet is None and len({LABELS[i] for i in plain.classes.flatten().tolist()}) == 4


def test_resume_is_bit_exact_within_alphabet():
    images = tagged()
    first = TaskSampler(images, 3, 1, 1, seed=2, alphabets=LABELS, within_alphabet=True)
    first.sample(5)
    state = first.state_dict()
    want = first.sample(7)
    resumed = TaskSampler(images, 3, 1, 1, seed=0, alphabets=LABELS, within_alphabet=True)
    resumed.load_state_dict(state)
    got = resumed.sample(7)
    assert torch.equal(got.classes, want.classes) and torch.equal(got.alphabet, want.alphabet)


def test_an_alphabet_of_exactly_n_characters_yields_all_of_them():
    sampler = TaskSampler(tagged(), ways=6, shots=1, queries=1, seed=0, alphabets=LABELS, within_alphabet=True)
    assert sampler.alphabet_names == ("Alpha",)
    batch = sampler.sample(10)
    alpha = sorted(i for i, a in enumerate(LABELS) if a == "Alpha")
    assert all(sorted(row.tolist()) == alpha for row in batch.classes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ways": 7}, r"no alphabet has ways=7 characters for within-alphabet tasks: the largest, Alpha, has 6 "
                      r"\(of 4 alphabets, 16 characters\)"),
        ({"alphabets": None}, "within_alphabet=True needs alphabets="),
        ({"alphabets": LABELS[:-1]}, "15 alphabet labels for 16 classes"),
    ],
)
def test_errors(kwargs, message):
    args = {"images": tagged(), "ways": 3, "shots": 1, "queries": 1, "alphabets": LABELS, "within_alphabet": True,
            **kwargs}
    with pytest.raises(ValueError, match=message):
        TaskSampler(**args)


def test_real_images_evaluation_alphabets(omniglot_root):
    """Background split, meta-test: images_evaluation's 20 alphabets (20 to 47 characters), 20-way tasks."""
    data = load_omniglot(omniglot_root)
    test = omniglot_split(data, "background")["test"]
    alphabets = omniglot_split_alphabets(data, "background")["test"]
    assert len(alphabets) == len(test) == 659 and len(set(alphabets)) == 20
    evaluation = [c for c, bg in zip(data.characters, data.background) if not bg]
    assert alphabets == [alphabet_of(c) for c in evaluation]  # 'alphabet/characterNN', in the split's order
    sampler = omniglot_sampler(test, 20, 1, 1, seed=0, alphabets=alphabets, within_alphabet=True)
    assert len(sampler.alphabet_names) == 20 and sampler.skipped_alphabets == {}
    batch = sampler.sample(50)
    assert all(len({alphabets[c] for c in row.tolist()}) == 1 for row in batch.classes)
    assert (batch.rotations == 0).all() and batch.support_x.shape == (50, 20, 1, 28, 28)
    # the paper split's 423 test characters spread over 50 alphabets: none has 20 (the largest has 18)
    paper = omniglot_split_alphabets(data, "paper")["test"]
    with pytest.raises(ValueError, match=r"no alphabet has ways=20 characters.*has 18 \(of 50 alphabets, 423"):
        omniglot_sampler(omniglot_split(data, "paper")["test"], 20, 1, 1, alphabets=paper, within_alphabet=True)


def test_a_mixed_batch_puts_its_within_alphabet_share_first_and_random_tasks_after():
    """within_fraction 0.25 of 16 tasks: the first 4 from one alphabet each (batch.alphabet names it), the other 12
    random (alphabet -1) and, over a few hundred of them, spanning several alphabets as random tasks do."""
    images = tagged()
    sampler = TaskSampler(images, ways=3, shots=1, queries=1, seed=3, alphabets=LABELS, within_alphabet=True,
                          within_fraction=0.25)
    spans = []
    for _ in range(20):
        batch = sampler.sample(16)
        assert batch.alphabet.tolist()[4:] == [-1] * 12 and (batch.alphabet[:4] >= 0).all()
        for t in range(16):
            classes = batch.classes[t].tolist()
            alphabets = {LABELS[c] for c in classes}
            assert len(set(classes)) == 3
            if t < 4:
                assert alphabets == {sampler.alphabet_names[batch.alphabet[t]]}
            else:
                spans.append(len(alphabets))
            tags = batch.support_x[t, :, 0, 0, 0].mul(255).round().long()
            assert torch.equal(tags, batch.classes[t])  # the pixels are the recorded classes'
    # 16 classes in 4 alphabets: a random 3-way task is drawn from one alphabet with probability 0.09
    assert sum(s > 1 for s in spans) / len(spans) > 0.75
    assert "for 0.25 of each batch" in repr(sampler)
    # a share that rounds to no task leaves a batch random; a share of 1 is the plain within-alphabet sampler
    assert (TaskSampler(images, 3, 1, 1, alphabets=LABELS, within_alphabet=True, within_fraction=0.1)
            .sample(4).alphabet == -1).all()
    full = TaskSampler(images, 3, 1, 1, seed=9, alphabets=LABELS, within_alphabet=True, within_fraction=1.0)
    plain = TaskSampler(images, 3, 1, 1, seed=9, alphabets=LABELS, within_alphabet=True)
    a, b = full.sample(8), plain.sample(8)
    assert torch.equal(a.classes, b.classes) and torch.equal(a.support_x, b.support_x)


def test_a_mixed_sampler_resumes_bit_for_bit():
    make = lambda seed: TaskSampler(tagged(), 3, 1, 1, seed=seed, alphabets=LABELS, within_alphabet=True,  # noqa: E731
                                    within_fraction=0.5)
    first = make(4)
    first.sample(6)
    state, want = first.state_dict(), first.sample(6)
    resumed = make(0)
    resumed.load_state_dict(state)
    got = resumed.sample(6)
    assert torch.equal(got.classes, want.classes) and torch.equal(got.alphabet, want.alphabet)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, True, "half"])
def test_a_within_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match=rf"within_fraction={fraction!r}, expected a number in \(0, 1\]"):
        TaskSampler(tagged(), 3, 1, 1, alphabets=LABELS, within_alphabet=True, within_fraction=fraction)
