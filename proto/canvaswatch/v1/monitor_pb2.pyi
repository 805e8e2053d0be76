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
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    INFO: _ClassVar[Severity]
    WARNING: _ClassVar[Severity]
    CRITICAL: _ClassVar[Severity]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT32: DType
INT64: DType
UINT8: DType
SEVERITY_UNSPECIFIED: Severity
INFO: Severity
WARNING: Severity
CRITICAL: Severity

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RequestInfo(_message.Message):
    __slots__ = ("request_id", "model", "tenant", "prompt_ids", "canvas_length", "total_steps", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    CANVAS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    tenant: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    canvas_length: int
    total_steps: int
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., canvas_length: _Optional[int] = ..., total_steps: _Optional[int] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("ids", "probs", "top_p")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    probs: Tensor
    top_p: float
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., probs: _Optional[_Union[Tensor, _Mapping]] = ..., top_p: _Optional[float] = ...) -> None: ...

class StepState(_message.Message):
    __slots__ = ("info", "block", "step", "topk", "embeddings", "logits", "canvas_ids", "final", "output_ids", "client_dropped_steps", "accepted", "entropy", "argmax_ids", "temperature")
    INFO_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    CANVAS_IDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_DROPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_IDS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    info: RequestInfo
    block: int
    step: int
    topk: TopK
    embeddings: Tensor
    logits: Tensor
    canvas_ids: _containers.RepeatedScalarFieldContainer[int]
    final: bool
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    client_dropped_steps: int
    accepted: Tensor
    entropy: Tensor
    argmax_ids: Tensor
    temperature: float
    def __init__(self, info: _Optional[_Union[RequestInfo, _Mapping]] = ..., block: _Optional[int] = ..., step: _Optional[int] = ..., topk: _Optional[_Union[TopK, _Mapping]] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., canvas_ids: _Optional[_Iterable[int]] = ..., final: _Optional[bool] = ..., output_ids: _Optional[_Iterable[int]] = ..., client_dropped_steps: _Optional[int] = ..., accepted: _Optional[_Union[Tensor, _Mapping]] = ..., entropy: _Optional[_Union[Tensor, _Mapping]] = ..., argmax_ids: _Optional[_Union[Tensor, _Mapping]] = ..., temperature: _Optional[float] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("block", "step", "positions", "snippet")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SNIPPET_FIELD_NUMBER: _ClassVar[int]
    block: int
    step: int
    positions: _containers.RepeatedScalarFieldContainer[int]
    snippet: str
    def __init__(self, block: _Optional[int] = ..., step: _Optional[int] = ..., positions: _Optional[_Iterable[int]] = ..., snippet: _Optional[str] = ...) -> None: ...

class Flag(_message.Message):
    __slots__ = ("monitor", "severity", "reason", "score", "evidence", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    monitor: str
    severity: Severity
    reason: str
    score: float
    evidence: _containers.RepeatedCompositeFieldContainer[Evidence]
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, monitor: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., reason: _Optional[str] = ..., score: _Optional[float] = ..., evidence: _Optional[_Iterable[_Union[Evidence, _Mapping]]] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("request_id", "flags", "max_severity", "steps_seen", "steps_dropped", "monitor_errors")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEVERITY_FIELD_NUMBER: _ClassVar[int]
    STEPS_SEEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    MONITOR_ERRORS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    flags: _containers.RepeatedCompositeFieldContainer[Flag]
    max_severity: Severity
    steps_seen: int
    steps_dropped: int
    monitor_errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., flags: _Optional[_Iterable[_Union[Flag, _Mapping]]] = ..., max_severity: _Optional[_Union[Severity, str]] = ..., steps_seen: _Optional[int] = ..., steps_dropped: _Optional[int] = ..., monitor_errors: _Optional[_Iterable[str]] = ...) -> None: ...

class MonitorEvent(_message.Message):
    __slots__ = ("request_id", "flag", "verdict")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    flag: Flag
    verdict: Verdict
    def __init__(self, request_id: _Optional[str] = ..., flag: _Optional[_Union[Flag, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class Trace(_message.Message):
    __slots__ = ("info", "steps")
    INFO_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    info: RequestInfo
    steps: _containers.RepeatedCompositeFieldContainer[StepState]
    def __init__(self, info: _Optional[_Union[RequestInfo, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[StepState, _Mapping]]] = ...) -> None: ...

class VerdictRequest(_message.Message):
    __slots__ = ("request_id", "wait_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    wait_s: float
    def __init__(self, request_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class VerdictReply(_message.Message):
    __slots__ = ("found", "verdict")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    found: bool
    verdict: Verdict
    def __init__(self, found: _Optional[bool] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class ListMonitorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MonitorInfo(_message.Message):
    __slots__ = ("name", "description", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListMonitorsResponse(_message.Message):
    __slots__ = ("monitors",)
    MONITORS_FIELD_NUMBER: _ClassVar[int]
    monitors: _containers.RepeatedCompositeFieldContainer[MonitorInfo]
    def __init__(self, monitors: _Optional[_Iterable[_Union[MonitorInfo, _Mapping]]] = ...) -> None: ...
