"""TaskSampler on synthetic arrays whose pixels identify their class and example, plus the Omniglot preprocessing."""

import numpy as np
import pytest
import torch

from models.preprocess import preprocess_uint8
from models.spec import ModelSpec
from trainer.data import TaskSampler, miniimagenet_sampler, omniglot_sampler

N_CLASSES, N_PER_CLASS, SIDE = 12, 10, 6


def tagged_images(channels: int | None = None, seed: int = 0) -> np.ndarray:
    """uint8 [12, 10, (C,) 6, 6], random and asymmetric (so every rotation differs), distinct per image."""
    rng = np.random.default_rng(seed)
    shape = (N_CLASSES, N_PER_CLASS) + ((channels,) if channels else ()) + (SIDE, SIDE)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    images.reshape(N_CLASSES, N_PER_CLASS, -1)[:, :, 0] = np.arange(N_CLASSES * N_PER_CLASS).reshape(N_CLASSES, -1)
    return images


def source_examples(images: np.ndarray, batch, which: str) -> torch.Tensor:
    """uint8 [T, N*S, C, H, W]: the source image of every example of the batch, from its recorded indices."""
    data = torch.as_tensor(images)
    if data.dim() == 4:
        data = data.unsqueeze(2)
    index = getattr(batch, f"{which}_index")
    per_class = index.shape[1] // batch.classes.shape[1]
    classes = batch.classes.repeat_interleave(per_class, dim=1)
    return data[classes, index]


def check_batch(images, sampler, batch, tasks):
    n, k, q = sampler.ways, sampler.shots, sampler.queries
    c = 1 if images.ndim == 4 else images.shape[2]
    assert batch.support_x.shape == (tasks, n * k, c, SIDE, SIDE) and batch.support_x.dtype == torch.float32
    assert batch.query_x.shape == (tasks, n * q, c, SIDE, SIDE) and batch.query_x.dtype == torch.float32
    assert batch.support_y.shape == (tasks, n * k) and batch.support_y.dtype == torch.int64
    assert batch.query_y.shape == (tasks, n * q) and batch.query_y.dtype == torch.int64
    assert batch.support_x.is_contiguous() and batch.query_x.is_contiguous()
    assert (batch.support_y == torch.arange(n).repeat_interleave(k)).all()
    assert (batch.query_y == torch.arange(n).repeat_interleave(q)).all()
    # classes without replacement per task; examples without replacement per class (support and query together)
    assert all(len(set(row.tolist())) == n for row in batch.classes)
    both = torch.cat([batch.support_index.view(tasks, n, k), batch.query_index.view(tasks, n, q)], dim=2)
    assert all(len(set(row.tolist())) == k + q for row in both.view(tasks * n, k + q))
    for which in ("support", "query"):
        src = source_examples(images, batch, which).float() / 255
        assert torch.equal(getattr(batch, f"{which}_x"), src)  # rotate=False: exactly the source pixels / 255


@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("as_torch", [False, True])
def test_shapes_labels_and_content(channels, as_torch):
    images = tagged_images(channels)
    source = torch.from_numpy(images) if as_torch else images
    sampler = TaskSampler(source, ways=5, shots=2, queries=3, seed=3)
    for tasks in (1, 7):
        check_batch(images, sampler, sampler.sample(tasks), tasks)
    assert sampler.tasks_sampled == 8


def test_labels_are_assigned_in_random_class_order_and_cover_all_classes():
    sampler = TaskSampler(tagged_images(), ways=5, shots=1, queries=1, seed=0)
    batch = sampler.sample(600)
    ordered = (batch.classes.diff(dim=1) > 0).all(dim=1).float().mean().item()
    assert ordered < 0.05  # 1/120 of the tasks when the order is random, all of them when sorted
    assert set(batch.classes.flatten().tolist()) == set(range(N_CLASSES))
    assert set(batch.support_index.flatten().tolist()) == set(range(N_PER_CLASS))
    counts = torch.bincount(batch.classes.flatten(), minlength=N_CLASSES).float()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()


def test_all_classes_and_all_examples_at_the_limits():
    sampler = TaskSampler(tagged_images(), ways=N_CLASSES, shots=4, queries=N_PER_CLASS - 4, seed=1)
    batch = sampler.sample(3)
    assert all(sorted(row.tolist()) == list(range(N_CLASSES)) for row in batch.classes)
    check_batch(tagged_images(), sampler, batch, 3)


def test_no_queries():
    batch = TaskSampler(tagged_images(), ways=3, shots=2, queries=0).sample(4)
    assert batch.query_x.shape == (4, 0, 1, SIDE, SIDE) and batch.query_y.shape == (4, 0)


def test_deterministic_per_seed():
    images = tagged_images()
    a = TaskSampler(images, 5, 1, 5, rotate=True, seed=7).sample(16)
    b = TaskSampler(images, 5, 1, 5, rotate=True, seed=7).sample(16)
    c = TaskSampler(images, 5, 1, 5, rotate=True, seed=8).sample(16)
    for name in ("support_x", "query_x", "classes", "support_index", "query_index", "rotations"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.classes, c.classes)


def test_resume_from_state_dict_is_bit_exact(tmp_path):
    images = tagged_images()
    first = TaskSampler(images, 5, 1, 5, rotate=True, seed=11)
    first.sample(4)
    torch.save({"sampler": first.state_dict()}, tmp_path / "state.pt")
    expected = [first.sample(4), first.sample(9)]
    resumed = TaskSampler(images, 5, 1, 5, rotate=True, seed=0)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["sampler"])
    assert resumed.seed == 11 and resumed.tasks_sampled == 4
    for want in expected:
        got = resumed.sample(want.num_tasks)
        assert torch.equal(got.support_x, want.support_x) and torch.equal(got.query_x, want.query_x)
        assert torch.equal(got.rotations, want.rotations)
    with pytest.raises(KeyError, match="lacks"):
        resumed.load_state_dict({"seed": 1})


def test_a_state_from_another_kind_of_device_reseeds_deterministically():
    """A CPU run continued on a GPU (or back): the generator state of the other device cannot be loaded, so the
    sampler re-seeds from (seed, tasks sampled), says so, and two such resumes draw the same tasks."""
    images = tagged_images()
    first = TaskSampler(images, 5, 1, 5, rotate=True, seed=11)
    first.sample(4)
    state = first.state_dict()
    assert not first.resumed_across_devices
    foreign = {**state, "generator": torch.zeros(16, dtype=torch.uint8)}  # a CUDA (Philox) state's size
    a, b = (TaskSampler(images, 5, 1, 5, rotate=True, seed=0) for _ in range(2))
    for s in (a, b):
        s.load_state_dict(foreign)
        assert s.resumed_across_devices and s.seed == 11 and s.tasks_sampled == 4
    got_a, got_b, uninterrupted = a.sample(6), b.sample(6), first.sample(6)
    assert torch.equal(got_a.support_x, got_b.support_x) and torch.equal(got_a.classes, got_b.classes)
    assert not torch.equal(got_a.classes, uninterrupted.classes)  # its own task stream, as the notice says


@pytest.mark.parametrize("channels", [None, 3])
def test_rotation_really_rotates(channels):
    images = tagged_images(channels)
    sampler = TaskSampler(images, ways=4, shots=2, queries=2, rotate=True, seed=5)
    batch = sampler.sample(50)
    assert set(batch.rotations.flatten().tolist()) == {0, 1, 2, 3}
    for which in ("support", "query"):
        src = source_examples(images, batch, which).float() / 255
        x = getattr(batch, f"{which}_x")
        per_class = x.shape[1] // 4
        turns = batch.rotations.repeat_interleave(per_class, dim=1)
        for t in range(batch.num_tasks):
            for i in range(x.shape[1]):
                k = int(turns[t, i])
                assert torch.equal(x[t, i], torch.rot90(src[t, i], k, dims=(-2, -1)))
                if k:
                    assert not torch.equal(x[t, i], src[t, i])


def test_omniglot_and_miniimagenet_preprocessing_match_models():
    images = tagged_images()
    omni = omniglot_sampler(images, 3, 1, 2, seed=2).sample(5)
    spec = ModelSpec("t", "conv4-omniglot", ways=3, inner_lr=0.4, steps=1)
    raw = source_examples(images, omni, "support")
    assert torch.equal(omni.support_x, preprocess_uint8(spec, raw))
    rgb = tagged_images(channels=3)
    mini = miniimagenet_sampler(rgb, 3, 1, 2, seed=2).sample(5)
    spec = ModelSpec("t", "conv4-miniimagenet", ways=3, inner_lr=0.01, steps=1)
    assert torch.equal(mini.query_x, preprocess_uint8(spec, source_examples(rgb, mini, "query")))


def test_custom_preprocess_and_to():
    batch = TaskSampler(tagged_images(), 2, 1, 1, preprocess=lambda x: x.to(torch.float64)).sample(2)
    assert batch.support_x.dtype == torch.float64 and batch.support_x.max() > 1
    moved = batch.to("cpu")
    assert torch.equal(moved.support_x, batch.support_x) and moved.amplitude is None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"ways": 13}, ValueError, "ways=13 but the images hold only 12 classes"),
        ({"shots": 5, "queries": 6}, ValueError, "5 \\+ 6 = 11 examples per class, but the images hold only 10"),
        ({"shots": 0}, ValueError, "shots=0, expected an integer >= 1"),
        ({"queries": -1}, ValueError, "queries=-1, expected an integer >= 0"),
        ({"ways": 2.0}, ValueError, "ways=2.0, expected an integer"),
        ({"images": np.zeros((4, 5, 6, 6), np.float32)}, TypeError, "dtype torch.float32, expected uint8"),
        ({"images": np.zeros((4, 5, 6), np.uint8)}, ValueError, r"shape \[4, 5, 6\], expected \[n_classes"),
        ({"images": np.zeros((4, 5, 6, 7), np.uint8), "ways": 2, "rotate": True}, ValueError,
         "square images, got H x W = 6 x 7"),
    ],
)
def test_errors(kwargs, error, message):
    args = {"images": tagged_images(), "ways": 5, "shots": 1, "queries": 1, **kwargs}
    with pytest.raises(error, match=message):
        TaskSampler(**args)


def test_tasks_must_be_positive():
    sampler = TaskSampler(tagged_images(), 5, 1, 1)
    with pytest.raises(ValueError, match="tasks=0, expected an integer >= 1"):
        sampler.sample(0)


def test_rotation_classes_draw_distinct_character_rotation_pairs():
    """rotation_classes: a task's N classes are distinct (character, rotation) pairs of the 4 x 12, so a character
    may appear beside its own rotation as another class; the pixels are that character rotated so."""
    images = tagged_images()
    sampler = TaskSampler(images, ways=10, shots=1, queries=1, rotate=True, rotation_classes=True, seed=2)
    batch = sampler.sample(200)
    pairs = batch.rotations * N_CLASSES + batch.classes
    assert all(len(set(row.tolist())) == 10 for row in pairs)  # distinct pairs
    # 10 of 12 characters without replacement could never repeat one; of 48 pairs, nearly every task does
    assert sum(len(set(row.tolist())) < 10 for row in batch.classes) > 150
    assert len(set(pairs.flatten().tolist())) == 4 * N_CLASSES
    src = source_examples(images, batch, "support").float() / 255
    for t in range(5):
        for i in range(10):
            assert torch.equal(batch.support_x[t, i], torch.rot90(src[t, i], int(batch.rotations[t, i]), dims=(-2, -1)))
    assert "rotations as classes" in repr(sampler)
    # 40-way tasks from 12 characters: only as pairs
    wide = TaskSampler(images, ways=40, shots=1, queries=1, rotate=True, rotation_classes=True)
    assert wide.sample(2).classes.shape == (2, 40)
    with pytest.raises(ValueError, match="rotation_classes=True with rotate=False"):
        TaskSampler(images, ways=4, shots=1, queries=1, rotation_classes=True)


def test_shift_moves_every_image_of_the_same_batch_by_its_own_offset():
    """shift=2: the batch holds the images the unshifted sampler draws for the seed, each one equal to
    models.views.shifted of it by some (dy, dx) in [-2, 2]^2, with offsets that differ between images."""
    from models.views import shifted

    images = tagged_images(seed=3)
    plain, moved = (TaskSampler(images, 5, 2, 3, seed=11, shift=s).sample(8) for s in (0, 2))
    assert torch.equal(plain.classes, moved.classes) and torch.equal(plain.query_index, moved.query_index)
    offsets = set()
    for which in ("support_x", "query_x"):
        src, got = getattr(plain, which).flatten(0, 1), getattr(moved, which).flatten(0, 1)
        for a, b in zip(src, got):
            found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(shifted(a, dy, dx), b)]
            assert found, "an image that is no shift of its source"
            offsets.add(found[0])
    assert len(offsets) > 10  # 200 images over 25 offsets: every image draws its own
    assert "shifts up to 2 px" in repr(TaskSampler(images, 5, 1, 1, shift=2))


@pytest.mark.parametrize("shift", [-1, 6, 1.5, True])
def test_a_shift_outside_the_image_is_refused(shift):
    with pytest.raises(ValueError, match=r"shift=.*, expected whole pixels in \[0, 5\]"):
        TaskSampler(tagged_images(), 5, 1, 1, shift=shift)


def _bilinear_reference(image: np.ndarray, degrees: float, sx: float, sy: float) -> np.ndarray:
    """`warped` of one [H, W] image, pixel by pixel in float64: each output pixel centre, relative to the image
    centre, is un-rotated (counterclockwise on screen is clockwise in (x right, y down)) and un-stretched, then read
    bilinearly from the input with coordinates clamped to the frame (edge pixels repeated)."""
    h, w = image.shape
    a = np.deg2rad(degrees)
    out = np.empty_like(image, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            x, y = j + 0.5 - w / 2, i + 0.5 - h / 2  # pixel centre, from the image centre
            xs, ys = (np.cos(a) * x - np.sin(a) * y * w / h) / sx, (np.sin(a) * x * h / w + np.cos(a) * y) / sy
            c, r = min(max(xs + w / 2 - 0.5, 0), w - 1), min(max(ys + h / 2 - 0.5, 0), h - 1)
            c0, r0 = min(int(np.floor(c)), w - 2), min(int(np.floor(r)), h - 2)
            fc, fr = c - c0, r - r0
            out[i, j] = ((1 - fr) * ((1 - fc) * image[r0, c0] + fc * image[r0, c0 + 1])
                         + fr * ((1 - fc) * image[r0 + 1, c0] + fc * image[r0 + 1, c0 + 1]))
    return out


def test_warped_turns_as_rot90_at_right_angles_and_matches_a_pixel_loop_reference_in_between():
    from trainer.data.sampler import warped

    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(4)
    for degrees, k in ((90, 1), (-90, -1), (180, 2)):
        got = warped(x, torch.full((4,), float(degrees)), ones, ones)
        torch.testing.assert_close(got, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(warped(x, torch.zeros(4), ones, ones), x, atol=1e-5, rtol=0)
    params = [(12.5, 1.1, 0.9), (-30.0, 0.85, 1.2), (3.0, 1.0, 1.0), (44.0, 1.3, 1.3)]
    got = warped(x, *(torch.tensor(p) for p in zip(*params)))
    for m, (degrees, sx, sy) in enumerate(params):
        expected = _bilinear_reference(x[m, 0].double().numpy(), degrees, sx, sy)
        np.testing.assert_allclose(got[m, 0].numpy(), expected, atol=1e-5)
    # a vertical bar 4 pixels wide, stretched 2x across: 8 wide, and the same bar stretched down is unchanged
    bar = torch.zeros(1, 1, 28, 28)
    bar[..., 12:16] = 1
    assert int((warped(bar, torch.zeros(1), torch.tensor([2.0]), torch.ones(1))[0, 0, 5] > 0.5).sum()) == 8
    torch.testing.assert_close(warped(bar, torch.zeros(1), torch.ones(1), torch.tensor([2.0])), bar)


def test_tilt_and_scale_warp_every_image_of_the_same_batch_by_its_own_map_reproducibly():
    """tilt/scale: the batch holds the images the plain sampler draws for the seed (same classes, examples, shifts),
    each one warped a little and differently; the same seed or a restored state draws the same warps."""
    images = np.random.default_rng(5).integers(0, 256, (12, 10, 28, 28), dtype=np.uint8)
    plain = TaskSampler(images, 5, 2, 3, seed=11, shift=1).sample(4)
    sampler = TaskSampler(images, 5, 2, 3, seed=11, shift=1, tilt=10, scale=0.1)
    warped_batch = sampler.sample(4)
    assert torch.equal(plain.classes, warped_batch.classes) and torch.equal(plain.query_index, warped_batch.query_index)
    for which in ("support_x", "query_x"):
        src, got = getattr(plain, which).flatten(0, 1), getattr(warped_batch, which).flatten(0, 1)
        change = (got - src).abs().flatten(1).mean(1)  # per image
        assert (change > 0).all() and change.max() < 0.35  # every image warped, none beyond recognition
        assert len(set(change.tolist())) == len(change)  # each by its own map
    state = sampler.state_dict()
    again = sampler.sample(4)
    sampler.load_state_dict(state)
    assert torch.equal(sampler.sample(4).support_x, again.support_x)
    twin = TaskSampler(images, 5, 2, 3, seed=11, shift=1, tilt=10, scale=0.1)
    assert torch.equal(twin.sample(4).query_x, warped_batch.query_x)
    assert "tilts up to 10 deg, axis scales 1 +- 0.1" in repr(sampler)


@pytest.mark.parametrize("kwargs, match", [({"tilt": -1}, r"tilt=-1, expected a number in \[0, 45\] degrees"),
                                           ({"tilt": 46}, r"tilt=46"), ({"tilt": True}, r"tilt=True"),
                                           ({"scale": 0.5}, r"scale=0.5, expected a number in \[0, 0.5\)"),
                                           ({"scale": "0.1"}, r"scale='0.1'")])
def test_a_warp_out_of_bounds_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskSampler(tagged_images(), 5, 1, 1, **kwargs)
