from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
UINT8: DType
FLOAT16: DType
FLOAT32: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "adapt_ms", "predict_ms", "total_ms", "batch_tasks")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ADAPT_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TASKS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    adapt_ms: float
    predict_ms: float
    total_ms: float
    batch_tasks: int
    def __init__(self, queue_ms: _Optional[float] = ..., adapt_ms: _Optional[float] = ..., predict_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_tasks: _Optional[int] = ...) -> None: ...

class Trajectories(_message.Message):
    __slots__ = ("observations", "actions", "rewards", "lengths")
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    observations: Tensor
    actions: Tensor
    rewards: Tensor
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, observations: _Optional[_Union[Tensor, _Mapping]] = ..., actions: _Optional[_Union[Tensor, _Mapping]] = ..., rewards: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class AdaptRequest(_message.Message):
    __slots__ = ("model", "support_x", "support_y", "steps", "inner_lr", "trajectories", "from_adaptation_id", "support_targets")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_X_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_Y_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INNER_LR_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    FROM_ADAPTATION_ID_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_TARGETS_FIELD_NUMBER: _ClassVar[int]
    model: str
    support_x: Tensor
    support_y: _containers.RepeatedScalarFieldContainer[int]
    steps: int
    inner_lr: float
    trajectories: Trajectories
    from_adaptation_id: str
    support_targets: Tensor
    def __init__(self, model: _Optional[str] = ..., support_x: _Optional[_Union[Tensor, _Mapping]] = ..., support_y: _Optional[_Iterable[int]] = ..., steps: _Optional[int] = ..., inner_lr: _Optional[float] = ..., trajectories: _Optional[_Union[Trajectories, _Mapping]] = ..., from_adaptation_id: _Optional[str] = ..., support_targets: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AdaptResponse(_message.Message):
    __slots__ = ("adaptation_id", "model", "steps", "inner_lr", "support_loss", "support_accuracy", "timings", "adaptation_bytes", "shared", "store_warning")
    ADAPTATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INNER_LR_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_LOSS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    STORE_WARNING_FIELD_NUMBER: _ClassVar[int]
    adaptation_id: str
    model: str
    steps: int
    inner_lr: float
    support_loss: _containers.RepeatedScalarFieldContainer[float]
    support_accuracy: _containers.RepeatedScalarFieldContainer[float]
    timings: Timings
    adaptation_bytes: int
    shared: bool
    store_warning: str
    def __init__(self, adaptation_id: _Optional[str] = ..., model: _Optional[str] = ..., steps: _Optional[int] = ..., inner_lr: _Optional[float] = ..., support_loss: _Optional[_Iterable[float]] = ..., support_accuracy: _Optional[_Iterable[float]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., adaptation_bytes: _Optional[int] = ..., shared: _Optional[bool] = ..., store_warning: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("adaptation_id", "query_x", "model")
    ADAPTATION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_X_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    adaptation_id: str
    query_x: Tensor
    model: str
    def __init__(self, adaptation_id: _Optional[str] = ..., query_x: _Optional[_Union[Tensor, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("logits", "labels", "timings", "probabilities", "action_mean", "action_log_std", "outputs")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ACTION_MEAN_FIELD_NUMBER: _ClassVar[int]
    ACTION_LOG_STD_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    timings: Timings
    probabilities: Tensor
    action_mean: Tensor
    action_log_std: Tensor
    outputs: Tensor
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., action_mean: _Optional[_Union[Tensor, _Mapping]] = ..., action_log_std: _Optional[_Union[Tensor, _Mapping]] = ..., outputs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AdaptAndPredictRequest(_message.Message):
    __slots__ = ("adapt", "query_x", "skip_cache")
    ADAPT_FIELD_NUMBER: _ClassVar[int]
    QUERY_X_FIELD_NUMBER: _ClassVar[int]
    SKIP_CACHE_FIELD_NUMBER: _ClassVar[int]
    adapt: AdaptRequest
    query_x: Tensor
    skip_cache: bool
    def __init__(self, adapt: _Optional[_Union[AdaptRequest, _Mapping]] = ..., query_x: _Optional[_Union[Tensor, _Mapping]] = ..., skip_cache: _Optional[bool] = ...) -> None: ...

class AdaptAndPredictResponse(_message.Message):
    __slots__ = ("adapt", "predict")
    ADAPT_FIELD_NUMBER: _ClassVar[int]
    PREDICT_FIELD_NUMBER: _ClassVar[int]
    adapt: AdaptResponse
    predict: PredictResponse
    def __init__(self, adapt: _Optional[_Union[AdaptResponse, _Mapping]] = ..., predict: _Optional[_Union[PredictResponse, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "arch", "ways", "input_shape", "input_dtype", "accepted_dtypes", "default_steps", "default_inner_lr", "learned_inner_lr", "bn_policy", "preprocessing", "provenance", "provenance_json", "num_params", "max_steps", "max_support", "max_queries", "ready", "not_ready_reason", "recipe", "adapt_params", "max_support_steps", "kind", "observation_size", "action_size", "discount", "baseline", "output_size", "action_low", "action_high", "max_trajectories", "max_horizon", "per_step_bn_steps", "head_init", "support_views", "query_views")
    class ProvenanceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    WAYS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_INNER_LR_FIELD_NUMBER: _ClassVar[int]
    LEARNED_INNER_LR_FIELD_NUMBER: _ClassVar[int]
    BN_POLICY_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SUPPORT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERIES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_REASON_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    ADAPT_PARAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_SUPPORT_STEPS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTION_SIZE_FIELD_NUMBER: _ClassVar[int]
    DISCOUNT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTION_LOW_FIELD_NUMBER: _ClassVar[int]
    ACTION_HIGH_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    MAX_HORIZON_FIELD_NUMBER: _ClassVar[int]
    PER_STEP_BN_STEPS_FIELD_NUMBER: _ClassVar[int]
    HEAD_INIT_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_VIEWS_FIELD_NUMBER: _ClassVar[int]
    QUERY_VIEWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    arch: str
    ways: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: DType
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    default_steps: int
    default_inner_lr: float
    learned_inner_lr: bool
    bn_policy: str
    preprocessing: str
    provenance: _containers.ScalarMap[str, str]
    provenance_json: str
    num_params: int
    max_steps: int
    max_support: int
    max_queries: int
    ready: bool
    not_ready_reason: str
    recipe: str
    adapt_params: str
    max_support_steps: int
    kind: str
    observation_size: int
    action_size: int
    discount: float
    baseline: str
    output_size: int
    action_low: float
    action_high: float
    max_trajectories: int
    max_horizon: int
    per_step_bn_steps: int
    head_init: str
    support_views: str
    query_views: str
    def __init__(self, name: _Optional[str] = ..., arch: _Optional[str] = ..., ways: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[_Union[DType, str]] = ..., accepted_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., default_steps: _Optional[int] = ..., default_inner_lr: _Optional[float] = ..., learned_inner_lr: _Optional[bool] = ..., bn_policy: _Optional[str] = ..., preprocessing: _Optional[str] = ..., provenance: _Optional[_Mapping[str, str]] = ..., provenance_json: _Optional[str] = ..., num_params: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_support: _Optional[int] = ..., max_queries: _Optional[int] = ..., ready: _Optional[bool] = ..., not_ready_reason: _Optional[str] = ..., recipe: _Optional[str] = ..., adapt_params: _Optional[str] = ..., max_support_steps: _Optional[int] = ..., kind: _Optional[str] = ..., observation_size: _Optional[int] = ..., action_size: _Optional[int] = ..., discount: _Optional[float] = ..., baseline: _Optional[str] = ..., output_size: _Optional[int] = ..., action_low: _Optional[float] = ..., action_high: _Optional[float] = ..., max_trajectories: _Optional[int] = ..., max_horizon: _Optional[int] = ..., per_step_bn_steps: _Optional[int] = ..., head_init: _Optional[str] = ..., support_views: _Optional[str] = ..., query_views: _Optional[str] = ...) -> None: ...

class ExportAdaptedRequest(_message.Message):
    __slots__ = ("adaptation_id",)
    ADAPTATION_ID_FIELD_NUMBER: _ClassVar[int]
    adaptation_id: str
    def __init__(self, adaptation_id: _Optional[str] = ...) -> None: ...

class ExportAdaptedResponse(_message.Message):
    __slots__ = ("onnx_model", "input_name", "output_name", "preprocessing")
    ONNX_MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    onnx_model: bytes
    input_name: str
    output_name: str
    preprocessing: str
    def __init__(self, onnx_model: _Optional[bytes] = ..., input_name: _Optional[str] = ..., output_name: _Optional[str] = ..., preprocessing: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("adaptation_id",)
    ADAPTATION_ID_FIELD_NUMBER: _ClassVar[int]
    adaptation_id: str
    def __init__(self, adaptation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...
