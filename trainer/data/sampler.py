"""N-way K-shot task sampling for classification, vectorized on the device.

A `TaskSampler` holds a uint8 image array [n_classes, n_per_class, C, H, W] on its device (moved there once) and a
torch.Generator on that device. `sample(T)` draws all T tasks at once: per task N classes without replacement
(the first N of a random permutation: argsort of uniform noise), per class K + Q examples without replacement, and with
`rotate` one random multiple of 90 degrees per class (as cbfinn/maml), taken from four pre-rotated copies of the array.
One `index_select` per set gathers the uint8 pixels; the preprocessing turns them into float32 model input on the
device. There is no Python loop per task or per image. The generator state is the sampler's whole state, so
`state_dict()` / `load_state_dict()` resume a run bit for bit.

`within_alphabet=True` (with one alphabet label per class) draws all N classes of a task from one alphabet: per task
one alphabet uniformly among those with at least N classes (`alphabet_groups`; the others are skipped and listed in
`skipped_alphabets`), then N of its classes without replacement. Harder than random tasks: what a user adapting to
one new script faces. `within_fraction` f < 1 mixes the two kinds in every batch (meta-training on hard tasks beside
random ones): the first round(f * T) tasks of a batch are within-alphabet, the others random (`batch.alphabet` is -1
for those).

`rotation_classes=True` (with rotate) makes each of a character's four rotations a class of its own, as Vinyals et al.
2016 and Snell et al. 2017 train on Omniglot: a task's N classes come from 4 x n_classes, so one task may hold a
character and its rotation as two classes (random tasks only).

`shift=s` (meta-training augmentation) moves every drawn image by its own random (dy, dx) in [-s, s]^2 pixels, edge
pixels repeated (as `models.views.shifted`): new drawings of the same characters each batch. The offsets are drawn
after the classes and examples, so a batch holds the same images as without the shift, each moved; s = 0 draws
nothing, and a run without it samples exactly as before.

`tilt=d` and `scale=z` (more of that augmentation) then warp every drawn image by its own small affine map: a rotation
by a uniform angle in [-d, d] degrees (not the 90-degree class rotations) and a stretch of each axis by its own factor
in [1 - z, 1 + z], bilinear, edge pixels repeated (`warped`): a character drawn a little tilted, wider or taller. Its
parameters are drawn after the shifts, so a run without it samples exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch


@dataclass
class TaskBatch:
    """T tasks. Classification: x float32 [T, N*K, C, H, W], y int64 [T, N*K] with labels 0..N-1, class-major
    (the K examples of label 0 first). Regression (sinusoid): x, y float32 [T, K, 1]. Query likewise with Q.

    Optional provenance, for tests and debugging: `classes` [T, N] (index into the sampler's class array of the class
    given label j), `support_index` [T, N*K] / `query_index` [T, N*Q] (example index within its class), `rotations`
    [T, N] (multiples of 90 degrees, counter-clockwise as torch.rot90), `amplitude` / `phase` [T] (sinusoid),
    `alphabet` [T] (within-alphabet tasks: index into the sampler's `alphabet_names` of the task's alphabet).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor | None = None
    support_index: torch.Tensor | None = None
    query_index: torch.Tensor | None = None
    rotations: torch.Tensor | None = None
    amplitude: torch.Tensor | None = None
    phase: torch.Tensor | None = None
    alphabet: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: str | torch.device) -> TaskBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TaskBatch(**{name: None if v is None else v.to(device) for name, v in moved.items()})


def scale_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (mini-ImageNet, and the sampler default)."""
    return x.float().div_(255.0)


def invert_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 Omniglot pixels (dark strokes) -> float32 1 - x/255 (strokes 1.0), as models.preprocess."""
    return 1.0 - x.float().div_(255.0)


def check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r}, expected an integer >= {minimum}")
    return int(value)


@dataclass(frozen=True)
class AlphabetGroups:
    """The classes of a split grouped by alphabet, for `ways`-way within-alphabet tasks.

    names: the alphabets with at least `ways` classes, sorted; members[i]: the class indices of names[i];
    skipped: {alphabet: its class count} for the alphabets with fewer than `ways` classes (never drawn).
    """

    ways: int
    names: tuple[str, ...]
    members: tuple[np.ndarray, ...]
    skipped: dict[str, int] = field(default_factory=dict)

    def notice(self) -> str:
        """One line saying which alphabets are skipped (empty when none is)."""
        if not self.skipped:
            return ""
        listed = ", ".join(f"{name} ({count})" for name, count in self.skipped.items())
        return (f"within-alphabet {self.ways}-way tasks: {len(self.skipped)} alphabet(s) with fewer than {self.ways} "
                f"characters skipped: {listed}; drawing from the other {len(self.names)}")


def alphabet_groups(alphabets: Sequence[str], ways: int) -> AlphabetGroups:
    """Group class indices by their alphabet label (alphabets[i]: the alphabet of class i); alphabets with fewer
    than `ways` classes are skipped. ValueError naming `ways` and the largest alphabet when none has enough."""
    ways = check_count("ways", ways, 1)
    labels = [str(a) for a in alphabets]
    if not labels:
        raise ValueError("within-alphabet tasks need one alphabet label per class, got none")
    by_alphabet: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_alphabet.setdefault(label, []).append(index)
    names = sorted(by_alphabet)
    kept = [a for a in names if len(by_alphabet[a]) >= ways]
    if not kept:
        largest = max(names, key=lambda a: (len(by_alphabet[a]), a))
        raise ValueError(
            f"no alphabet has ways={ways} characters for within-alphabet tasks: the largest, {largest}, has "
            f"{len(by_alphabet[largest])} (of {len(names)} alphabets, {len(labels)} characters)"
        )
    return AlphabetGroups(ways=ways, names=tuple(kept),
                          members=tuple(np.asarray(by_alphabet[a], dtype=np.int64) for a in kept),
                          skipped={a: len(by_alphabet[a]) for a in names if len(by_alphabet[a]) < ways})


class GeneratorState:
    """The resumable part of a sampler: a torch.Generator on the sampler's device, seeded from `seed`."""

    def __init__(self, seed: int, device: str | torch.device):
        self.device = torch.device(device)
        self.seed = int(seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.tasks_sampled = 0
        self.resumed_across_devices = False

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed, "tasks_sampled": self.tasks_sampled}

    def load_state_dict(self, state: dict) -> None:
        """Restores the generator bit for bit. A state saved on another kind of device (a CPU run continued on a GPU:
        mt19937 vs Philox, states of different sizes) cannot be restored; the generator is then re-seeded from
        (seed, tasks sampled so far), so the run goes on deterministically with a task stream of its own, and
        `resumed_across_devices` says so."""
        missing = {"generator", "seed", "tasks_sampled"} - set(state)
        if missing:
            raise KeyError(f"sampler state lacks {sorted(missing)}, expected a dict from state_dict()")
        self.seed = int(state["seed"])
        self.tasks_sampled = int(state["tasks_sampled"])
        saved = state["generator"].cpu()
        self.resumed_across_devices = saved.numel() != self.generator.get_state().numel()
        if self.resumed_across_devices:
            self.generator.manual_seed((self.seed * 1_000_003 + self.tasks_sampled) % 2**63)
        else:
            self.generator.set_state(saved)


MAX_TILT, MAX_SCALE = 45.0, 0.5  # the warp's bounds: a character stays upright-ish and inside the frame


def check_warp(tilt, scale) -> tuple[float, float]:
    """(tilt, scale) as floats, or ValueError naming the bad one: tilt degrees in [0, 45], scale in [0, 0.5)."""
    for name, value, top, closed in (("tilt", tilt, MAX_TILT, True), ("scale", scale, MAX_SCALE, False)):
        if (isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating)
                or not (0 <= value <= top if closed else 0 <= value < top)):
            raise ValueError(f"{name}={value!r}, expected a number in [0, {top:g}{']' if closed else ')'}"
                             + (" degrees" if name == "tilt" else ""))
    return float(tilt), float(scale)


def warped(x: torch.Tensor, degrees: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """x [M, C, H, W] with image m rotated counterclockwise by degrees[m] (as torch.rot90 turns at 90) and stretched
    by sx[m] across and sy[m] down about its centre: bilinear, edge pixels repeated into what the frame uncovers.

    The sampling grid maps each output pixel centre back into the input: S^-1 R^-1 (rotation after the stretch)."""
    a = torch.deg2rad(degrees.to(x.dtype))
    cos, sin = torch.cos(a), torch.sin(a)
    sx, sy = sx.to(x.dtype), sy.to(x.dtype)
    # affine_grid coordinates are (x right, y down) in [-1, 1]; R^-1 of a counterclockwise turn on screen
    theta = torch.stack([torch.stack([cos / sx, -sin / sx, torch.zeros_like(a)], -1),
                         torch.stack([sin / sy, cos / sy, torch.zeros_like(a)], -1)], 1)  # [M, 2, 3]
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TaskSampler(GeneratorState):
    """N-way (`ways`), K-shot (`shots`) tasks with `queries` query examples per class, drawn from uint8 `images`.

    images: uint8 [n_classes, n_per_class, H, W] or [n_classes, n_per_class, C, H, W], numpy or torch.
    preprocess: uint8 tensor -> float tensor on the device (default x/255).
    alphabets / within_alphabet: one alphabet label per class; with within_alphabet=True every task's classes come
    from one alphabet (see `alphabet_groups`): `alphabet_names`, `skipped_alphabets` and `batch.alphabet` say which.
    within_fraction: with within_alphabet=True, the share of each batch's tasks drawn within one alphabet (the first
    round(within_fraction * T)); the rest are random tasks. 1.0 (default): all of them.
    rotation_classes: with rotate=True, draw each task's classes from the 4 x n_classes (character, rotation) pairs.
    shift: move every image by a random (dy, dx) in [-shift, shift]^2 pixels (augmentation; 0: none).
    tilt, scale: warp every image by a random rotation in [-tilt, tilt] degrees and a stretch of each axis in
    [1 - scale, 1 + scale] (augmentation, after the shift; 0, 0: none).
    """

    def __init__(
        self,
        images,
        ways: int,
        shots: int,
        queries: int,
        rotate: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        alphabets: Sequence[str] | None = None,
        within_alphabet: bool = False,
        within_fraction: float = 1.0,
        rotation_classes: bool = False,
        shift: int = 0,
        tilt: float = 0.0,
        scale: float = 0.0,
    ):
        super().__init__(seed, device)
        data = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
        if data.dtype != torch.uint8:
            raise TypeError(f"images have dtype {data.dtype}, expected uint8 pixels")
        if data.dim() == 4:
            data = data.unsqueeze(2)
        if data.dim() != 5:
            raise ValueError(
                f"images have shape {list(data.shape)}, expected [n_classes, n_per_class, H, W] or [..., C, H, W]"
            )
        self.ways = check_count("ways", ways, 1)
        self.shots = check_count("shots", shots, 1)
        self.queries = check_count("queries", queries, 0)
        n_classes, n_per_class = data.shape[:2]
        if self.ways > n_classes * (4 if rotation_classes and rotate else 1):
            raise ValueError(f"ways={ways} but the images hold only {n_classes} classes"
                             + (" (x 4 rotations)" if rotation_classes and rotate else ""))
        if self.shots + self.queries > n_per_class:
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {shots + queries} examples per class, "
                f"but the images hold only {n_per_class} per class"
            )
        if isinstance(shift, bool) or not isinstance(shift, int | np.integer) or not 0 <= shift < min(data.shape[-2:]):
            raise ValueError(f"shift={shift!r}, expected whole pixels in [0, {min(data.shape[-2:]) - 1}]")
        self.shift = int(shift)
        self.tilt, self.scale = check_warp(tilt, scale)
        self.rotate = bool(rotate)
        if self.rotate and data.shape[-1] != data.shape[-2]:
            raise ValueError(f"rotate=True needs square images, got H x W = {data.shape[-2]} x {data.shape[-1]}")
        self.preprocess = preprocess or scale_uint8
        self.n_classes, self.n_per_class = int(n_classes), int(n_per_class)
        self.example_shape = tuple(data.shape[2:])
        data = data.to(self.device)
        # [4, n_classes, n_per_class, C, H, W]: copy r is rotated by r * 90 degrees; a rotation is then one gather.
        # Without rotation the array is used in place (no copy of a numpy array on the CPU).
        if self.rotate:
            self.pixels = torch.stack([torch.rot90(data, r, dims=(-2, -1)) for r in range(4)]).contiguous()
        else:
            self.pixels = data.contiguous().unsqueeze(0)
        # One row per (rotation, class, example): a flat index_select is ~5x faster than 3-tensor advanced indexing.
        self._rows = self.pixels.view(-1, *self.example_shape)
        n, k, q = self.ways, self.shots, self.queries
        self._support_y = torch.arange(n, device=self.device).repeat_interleave(k)
        self._query_y = torch.arange(n, device=self.device).repeat_interleave(q)
        self.within_alphabet = bool(within_alphabet)
        if (isinstance(within_fraction, bool) or not isinstance(within_fraction, int | float | np.floating)
                or not 0.0 < within_fraction <= 1.0):
            raise ValueError(f"within_fraction={within_fraction!r}, expected a number in (0, 1]")
        self.within_fraction = float(within_fraction)
        self.rotation_classes = bool(rotation_classes)
        if self.rotation_classes and (not self.rotate or self.within_alphabet):
            raise ValueError(f"rotation_classes=True with rotate={self.rotate}, "
                             f"within_alphabet={self.within_alphabet}: expected rotate=True and random tasks "
                             "(within_alphabet=False)")
        self.groups: AlphabetGroups | None = None
        if alphabets is not None and len(alphabets) != n_classes:
            raise ValueError(f"{len(alphabets)} alphabet labels for {n_classes} classes, expected one per class")
        if self.within_alphabet:
            if alphabets is None:
                raise ValueError("within_alphabet=True needs alphabets=, one alphabet label per class")
            self.groups = alphabet_groups(alphabets, self.ways)
            # [G, largest] class indices of each alphabet, padded with 0 beyond its size [G]
            sizes = [len(m) for m in self.groups.members]
            members = torch.zeros(len(sizes), max(sizes), dtype=torch.int64)
            for g, m in enumerate(self.groups.members):
                members[g, : len(m)] = torch.from_numpy(m)
            self._members, self._sizes = members.to(self.device), torch.tensor(sizes, device=self.device)

    @property
    def alphabet_names(self) -> tuple[str, ...]:
        """The alphabets within-alphabet tasks are drawn from (batch.alphabet indexes them); () otherwise."""
        return self.groups.names if self.groups else ()

    @property
    def skipped_alphabets(self) -> dict[str, int]:
        """{alphabet: class count} of the alphabets too small for `ways`-way within-alphabet tasks."""
        return dict(self.groups.skipped) if self.groups else {}

    def _draw_without_replacement(self, shape: tuple[int, ...], count: int) -> torch.Tensor:
        """`count` distinct values of range(shape[-1]) in random order, independently per leading index: the first
        `count` entries of the permutation that sorts iid uniform noise.

        (`noise.topk(count)` draws from the same distribution ~10x faster on the CPU, 0.2 vs 1.9 ms for 32 x 1100,
        but picks other tasks for a seed; it is not worth breaking the reproducibility of recorded runs for.)
        """
        noise = torch.rand(shape, generator=self.generator, device=self.device)
        return noise.argsort(dim=-1)[..., :count]

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.preprocess(self._rows.index_select(0, rows))

    def _shifted(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, C, H, W], each image moved by its own random (dy, dx) in [-shift, shift]^2, edge pixels repeated: one
        replicate padding, then one gather of every image's H x W window."""
        s, (m, _, h, w) = self.shift, x.shape
        if m == 0:
            return x
        offsets = torch.randint(0, 2 * s + 1, (m, 2), generator=self.generator, device=self.device)  # s - (dy, dx)
        padded = torch.nn.functional.pad(x, (s, s, s, s), mode="replicate")  # [M, C, H + 2s, W + 2s]
        rows = offsets[:, 0, None] + torch.arange(h, device=self.device)  # [M, H]
        cols = offsets[:, 1, None] + torch.arange(w, device=self.device)  # [M, W]
        index = torch.arange(m, device=self.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

    def _warped(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, C, H, W], each image warped by its own angle in [-tilt, tilt] and axis factors in [1 +- scale]."""
        m = x.shape[0]
        if m == 0:
            return x
        u = torch.rand((m, 3), generator=self.generator, device=self.device) * 2 - 1  # [-1, 1)
        return warped(x, u[:, 0] * self.tilt, 1 + u[:, 1] * self.scale, 1 + u[:, 2] * self.scale)

    def sample(self, tasks: int) -> TaskBatch:
        tasks = check_count("tasks", tasks, 1)
        n, k, q = self.ways, self.shots, self.queries
        alphabet = rotations = None
        if self.rotation_classes:  # (rotation, character) pairs as classes: the pair index is r * n_classes + c
            pairs = self._draw_without_replacement((tasks, 4 * self.n_classes), n)  # [T, N]
            rotations, classes = pairs // self.n_classes, pairs % self.n_classes
        else:
            within = round(self.within_fraction * tasks) if self.within_alphabet else 0
            drawn = []
            if within:  # one alphabet per task, then N of its classes (padding sorts last: noise 2 > 1)
                picked = torch.randint(0, len(self._sizes), (within,), generator=self.generator, device=self.device)
                noise = torch.rand((within, self._members.shape[1]), generator=self.generator, device=self.device)
                padding = torch.arange(self._members.shape[1], device=self.device) >= self._sizes[picked][:, None]
                chosen = noise.masked_fill_(padding, 2.0).argsort(dim=-1)[:, :n]
                drawn.append(self._members[picked].gather(1, chosen))  # [within, N]
            if within < tasks:  # random tasks after the within-alphabet ones
                drawn.append(self._draw_without_replacement((tasks - within, self.n_classes), n))
            classes = torch.cat(drawn) if len(drawn) > 1 else drawn[0]  # [T, N]
            if self.within_alphabet:  # the task's alphabet; -1 for the random tasks of a mixed batch
                alphabet = torch.full((tasks,), -1, dtype=torch.int64, device=self.device)
                if within:
                    alphabet[:within] = picked
        examples = self._draw_without_replacement((tasks, n, self.n_per_class), k + q)  # [T, N, K+Q]
        if rotations is None:  # (rotation classes draw theirs with the classes)
            rotations = (torch.randint(0, 4, (tasks, n), generator=self.generator, device=self.device) if self.rotate
                         else torch.zeros(tasks, n, dtype=torch.int64, device=self.device))
        rows = (rotations[..., None] * self.n_classes + classes[..., None]) * self.n_per_class + examples
        support_rows, query_rows = rows[:, :, :k].reshape(-1), rows[:, :, k:].reshape(-1)
        self.tasks_sampled += tasks
        support_x, query_x = self._gather(support_rows), self._gather(query_rows)
        if self.shift:
            support_x, query_x = self._shifted(support_x), self._shifted(query_x)
        if self.tilt or self.scale:
            support_x, query_x = self._warped(support_x), self._warped(query_x)
        return TaskBatch(
            support_x=support_x.reshape(tasks, n * k, *self.example_shape),
            support_y=self._support_y.expand(tasks, n * k).contiguous(),
            query_x=query_x.reshape(tasks, n * q, *self.example_shape),
            query_y=self._query_y.expand(tasks, n * q).contiguous(),
            classes=classes,
            support_index=examples[:, :, :k].reshape(tasks, n * k),
            query_index=examples[:, :, k:].reshape(tasks, n * q),
            rotations=rotations,
            alphabet=alphabet,
        )

    def __repr__(self) -> str:
        return (
            f"TaskSampler({self.n_classes} classes x {self.n_per_class}, {list(self.example_shape)}, ways={self.ways}, "
            f"shots={self.shots}, queries={self.queries}, rotate={self.rotate}, seed={self.seed}, device={self.device}"
            + (f", within {len(self.alphabet_names)} alphabets" if self.within_alphabet else "")
            + (f" for {self.within_fraction:g} of each batch" if self.within_alphabet and self.within_fraction < 1
               else "") + (", rotations as classes" if self.rotation_classes else "")
            + (f", shifts up to {self.shift} px" if self.shift else "")
            + (f", tilts up to {self.tilt:g} deg, axis scales 1 +- {self.scale:g}" if self.tilt or self.scale else "")
            + ")"
        )


def omniglot_sampler(split_images, ways: int, shots: int, queries: int, rotate: bool = False, seed: int = 0,
                     device: str | torch.device = "cpu", alphabets: Sequence[str] | None = None,
                     within_alphabet: bool = False, within_fraction: float = 1.0,
                     rotation_classes: bool = False, shift: int = 0, tilt: float = 0.0,
                     scale: float = 0.0) -> TaskSampler:
    """A sampler over one Omniglot split (uint8 [n, 20, 28, 28]) with the Omniglot preprocessing 1 - x/255.

    alphabets: the alphabet of each class of the split (`omniglot_split_alphabets`), for within_alphabet=True."""
    return TaskSampler(split_images, ways, shots, queries, rotate=rotate, seed=seed, device=device,
                       preprocess=invert_uint8, alphabets=alphabets, within_alphabet=within_alphabet,
                       within_fraction=within_fraction, rotation_classes=rotation_classes, shift=shift, tilt=tilt,
                       scale=scale)

