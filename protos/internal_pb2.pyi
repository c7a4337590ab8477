from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Array(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class DraftPrefillRequest(_message.Message):
    __slots__ = ("slot", "tokens", "sampling", "hidden")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    slot: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    hidden: Array
    def __init__(self, slot: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., hidden: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class DraftPrefillReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Verdicts(_message.Message):
    __slots__ = ("rows", "tokens", "positions", "accepted", "hidden")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    rows: Array
    tokens: Array
    positions: Array
    accepted: Array
    hidden: Array
    def __init__(self, rows: _Optional[_Union[Array, _Mapping]] = ..., tokens: _Optional[_Union[Array, _Mapping]] = ..., positions: _Optional[_Union[Array, _Mapping]] = ..., accepted: _Optional[_Union[Array, _Mapping]] = ..., hidden: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("update", "rows", "tokens", "positions", "reach")
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    REACH_FIELD_NUMBER: _ClassVar[int]
    update: Verdicts
    rows: Array
    tokens: Array
    positions: Array
    reach: int
    def __init__(self, update: _Optional[_Union[Verdicts, _Mapping]] = ..., rows: _Optional[_Union[Array, _Mapping]] = ..., tokens: _Optional[_Union[Array, _Mapping]] = ..., positions: _Optional[_Union[Array, _Mapping]] = ..., reach: _Optional[int] = ...) -> None: ...

class DraftReply(_message.Message):
    __slots__ = ("drafts", "proposed", "sampled", "q")
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    drafts: Array
    proposed: Array
    sampled: Array
    q: Array
    def __init__(self, drafts: _Optional[_Union[Array, _Mapping]] = ..., proposed: _Optional[_Union[Array, _Mapping]] = ..., sampled: _Optional[_Union[Array, _Mapping]] = ..., q: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class VerifyPrefillRequest(_message.Message):
    __slots__ = ("slot", "tokens", "sampling", "adapter", "hidden_layers", "resume_token")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    slot: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    adapter: int
    hidden_layers: _containers.RepeatedScalarFieldContainer[int]
    resume_token: int
    def __init__(self, slot: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., adapter: _Optional[int] = ..., hidden_layers: _Optional[_Iterable[int]] = ..., resume_token: _Optional[int] = ...) -> None: ...

class VerifyPrefillReply(_message.Message):
    __slots__ = ("token", "logprob", "hidden")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    hidden: Array
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., hidden: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("rows", "drafts", "proposed", "sampled", "q", "defer", "trims", "hidden_layers", "reach")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    DEFER_FIELD_NUMBER: _ClassVar[int]
    TRIMS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    REACH_FIELD_NUMBER: _ClassVar[int]
    rows: Array
    drafts: Array
    proposed: Array
    sampled: Array
    q: Array
    defer: bool
    trims: bool
    hidden_layers: _containers.RepeatedScalarFieldContainer[int]
    reach: int
    def __init__(self, rows: _Optional[_Union[Array, _Mapping]] = ..., drafts: _Optional[_Union[Array, _Mapping]] = ..., proposed: _Optional[_Union[Array, _Mapping]] = ..., sampled: _Optional[_Union[Array, _Mapping]] = ..., q: _Optional[_Union[Array, _Mapping]] = ..., defer: _Optional[bool] = ..., trims: _Optional[bool] = ..., hidden_layers: _Optional[_Iterable[int]] = ..., reach: _Optional[int] = ...) -> None: ...

class VerifyReply(_message.Message):
    __slots__ = ("tokens", "logprobs", "accepted", "hidden")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    tokens: Array
    logprobs: Array
    accepted: Array
    hidden: Array
    def __init__(self, tokens: _Optional[_Union[Array, _Mapping]] = ..., logprobs: _Optional[_Union[Array, _Mapping]] = ..., accepted: _Optional[_Union[Array, _Mapping]] = ..., hidden: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...
