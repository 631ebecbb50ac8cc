"""Model specs: what a meta-initialization is (architecture, input, ways, inner-loop defaults, BN policy)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

BN_POLICIES = ("transductive", "support", "running")
ADAPT_PARAMS = ("all", "head", "no-bn")  # the inner loop updates every parameter (MAML), the head (ANIL), all but BN
# How adapt starts the linear head: from the meta-learned head (MAML, ANIL), or from the support set's class
# prototypes in the body's feature space (Proto-MAML, Triantafillou et al. 2020: W_c = 2 mu_c, b_c = -|mu_c|^2, so the
# head's logits before any step are a nearest-centroid classifier's, -|f - mu_c|^2 up to a per-query constant).
HEAD_INITS = ("meta", "proto")
ARCHITECTURES = ("conv4-omniglot", "conv4-miniimagenet", "mlp-omniglot", "mlp-sinusoid")
# Views (models.views): name -> the (dy, dx) pixel shifts of every view of a support (or query) image, itself first.
SUPPORT_VIEWS: dict[str, tuple[tuple[int, int], ...]] = {
    "none": ((0, 0),),
    # the image and its shifts by 1 and 2 pixels down, up, right and left: 9 views
    "cross2": ((0, 0), (1, 0), (-1, 0), (2, 0), (-2, 0), (0, 1), (0, -1), (0, 2), (0, -2)),
}
VIEW_ARCHS = ("conv4-omniglot", "conv4-miniimagenet")  # image inputs [C, H, W]

# Inputs each architecture takes per example (C, H, W) or (features,).
ARCH_INPUT_SHAPE = {
    "conv4-omniglot": (1, 28, 28),
    "conv4-miniimagenet": (3, 84, 84),
    "mlp-omniglot": (1, 28, 28),
    "mlp-sinusoid": (1,),
}

# How uint8 pixels become model input: the training preprocessing, applied by the server to raw uint8 input.
ARCH_PREPROCESSING = {
    "conv4-omniglot": "omniglot: uint8 28x28 grayscale as the PNGs store it (dark strokes) -> 1 - x/255",
    "conv4-miniimagenet": "miniimagenet: uint8 84x84 RGB, channels first -> x/255",
    "mlp-omniglot": "omniglot: uint8 28x28 grayscale as the PNGs store it (dark strokes) -> 1 - x/255",
    "mlp-sinusoid": "sinusoid: x in [-5, 5] as float32; uint8 input is not accepted",
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild, adapt and serve a meta-initialization (its tensors aside).

    `inner_lr` and `steps` are the serving defaults; `bn_policy` says how query images are normalized:
    `transductive` uses the batch statistics of whatever is forwarded (the paper's behaviour) and `support`
    uses the support set's statistics so one query's prediction never depends on the other queries; `running`
    (MAML++'s per-step running statistics) normalizes every forward, support and queries alike, with per-layer,
    per-step statistics the checkpoint carries (MetaModel.bn_running), so a single query needs neither its
    neighbours nor the support set.
    """

    name: str
    arch: str
    ways: int
    inner_lr: float
    steps: int
    bn_policy: str = "support"
    input_shape: tuple[int, ...] = field(default=())
    hidden: int = 0  # conv filters / unused for MLPs (0 = architecture default)
    # Which parameters adapt at adapt time: all (MAML, Meta-SGD), head (ANIL), no-bn (MAML++). Older checkpoints: all.
    adapt_params: str = "all"
    # How adapt starts the head (HEAD_INITS): meta (the checkpoint's head) or proto (the support prototypes; the
    # checkpoint's head tensors are then unused). Older checkpoints: meta.
    head_init: str = "meta"
    # Which views of every support image adapt sees (models.views.SUPPORT_VIEWS): none, or cross2 (the image and its
    # 1- and 2-pixel shifts). Image architectures only. Older checkpoints: none.
    support_views: str = "none"
    # Which views of every query image predict averages the logits over (a SUPPORT_VIEWS name: none, or cross2): the
    # test-time ensemble of a query and its shifts. Image architectures only. Older checkpoints: none.
    query_views: str = "none"

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model spec {self.name!r}: arch {self.arch!r}, expected one of {ARCHITECTURES}")
        if self.bn_policy not in BN_POLICIES:
            raise ValueError(f"model spec {self.name!r}: bn_policy {self.bn_policy!r}, expected one of {BN_POLICIES}")
        if self.adapt_params not in ADAPT_PARAMS:
            raise ValueError(f"model spec {self.name!r}: adapt_params {self.adapt_params!r}, expected one of "
                             f"{ADAPT_PARAMS}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"model spec {self.name!r}: head_init {self.head_init!r}, expected one of {HEAD_INITS}")
        if self.head_init == "proto" and (self.adapt_params != "head" or self.arch == "mlp-sinusoid"):
            raise ValueError(f"model spec {self.name!r}: head_init 'proto' with arch {self.arch!r} and adapt_params "
                             f"{self.adapt_params!r}: prototypes need a classifier whose body is fixed during "
                             "adaptation; expected adapt_params 'head' on a classification architecture")
        if self.ways < 1:
            raise ValueError(f"model spec {self.name!r}: ways={self.ways}, expected >= 1")
        for field_name in ("support_views", "query_views"):
            views = getattr(self, field_name)
            if views not in SUPPORT_VIEWS:
                raise ValueError(f"model spec {self.name!r}: {field_name} {views!r}, expected one of "
                                 f"{tuple(SUPPORT_VIEWS)}")
            if views != "none" and self.arch not in VIEW_ARCHS:
                raise ValueError(f"model spec {self.name!r}: {field_name} {views!r} with arch {self.arch!r}: shifted "
                                 f"views need image inputs, expected one of {VIEW_ARCHS}")
        if not self.input_shape:
            object.__setattr__(self, "input_shape", ARCH_INPUT_SHAPE[self.arch])
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if not self.hidden:
            object.__setattr__(self, "hidden", {"conv4-omniglot": 64, "conv4-miniimagenet": 32}.get(self.arch, 0))

    @property
    def is_regression(self) -> bool:
        return self.arch == "mlp-sinusoid"

    @property
    def has_batch_norm(self) -> bool:
        return self.arch != "mlp-sinusoid"

    def predict_needs_support_stats(self, policy: str | None = None) -> bool:
        """Whether predict normalizes with the support set's statistics: the `support` policy (the model's own, or
        `policy`) on an architecture with batch norm. The one place this question is answered."""
        return (policy or self.bn_policy) == "support" and self.has_batch_norm

    def uses_running_stats(self, policy: str | None = None) -> bool:
        """Whether every forward normalizes with the checkpoint's per-step running statistics (`running`, the
        model's own policy or `policy`) on an architecture with batch norm: adapt and predict then need them."""
        return (policy or self.bn_policy) == "running" and self.has_batch_norm

    @property
    def support_view_count(self) -> int:
        """Rows adapt sees per support row (1 without support views)."""
        return len(SUPPORT_VIEWS[self.support_views])

    @property
    def query_view_count(self) -> int:
        """Rows predict forwards per query row (1 without query views)."""
        return len(SUPPORT_VIEWS[self.query_views])

    @property
    def preprocessing(self) -> str:
        return ARCH_PREPROCESSING[self.arch]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        d["input_shape"] = tuple(d.get("input_shape", ()))
        return cls(**d)

    def with_(self, **changes) -> ModelSpec:
        d = self.to_dict()
        d.update(changes)
        return ModelSpec.from_dict(d)
