from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmissionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBMISSION_STATE_UNSPECIFIED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_ACCEPTED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_HELD: _ClassVar[SubmissionState]
    SUBMISSION_STATE_REJECTED: _ClassVar[SubmissionState]
SUBMISSION_STATE_UNSPECIFIED: SubmissionState
SUBMISSION_STATE_ACCEPTED: SubmissionState
SUBMISSION_STATE_HELD: SubmissionState
SUBMISSION_STATE_REJECTED: SubmissionState

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("format_version", "site_id", "release_id", "trunk_id", "adaptor_json", "tensors", "created_at", "nonce", "signer_public_key", "signature", "body")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TRUNK_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTOR_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    site_id: str
    release_id: str
    trunk_id: str
    adaptor_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    created_at: str
    nonce: bytes
    signer_public_key: bytes
    signature: bytes
    body: bytes
    def __init__(self, format_version: _Optional[int] = ..., site_id: _Optional[str] = ..., release_id: _Optional[str] = ..., trunk_id: _Optional[str] = ..., adaptor_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., created_at: _Optional[str] = ..., nonce: _Optional[bytes] = ..., signer_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., body: _Optional[bytes] = ...) -> None: ...

class BundleBody(_message.Message):
    __slots__ = ("site_id", "release_id", "trunk_id", "adaptor_json", "tensors", "created_at", "nonce")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TRUNK_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTOR_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    release_id: str
    trunk_id: str
    adaptor_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    created_at: str
    nonce: bytes
    def __init__(self, site_id: _Optional[str] = ..., release_id: _Optional[str] = ..., trunk_id: _Optional[str] = ..., adaptor_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., created_at: _Optional[str] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class TensorSet(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class Composite(_message.Message):
    __slots__ = ("manifest_json", "statement_json", "signature", "tensors")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    statement_json: str
    signature: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, manifest_json: _Optional[str] = ..., statement_json: _Optional[str] = ..., signature: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class GetCompositeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CompositeChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CompositeHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[CompositeHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CompositeHeader(_message.Message):
    __slots__ = ("generation", "content_hash", "total_bytes", "sha256")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    generation: int
    content_hash: str
    total_bytes: int
    sha256: str
    def __init__(self, generation: _Optional[int] = ..., content_hash: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class SubmitBundleRequest(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: bytes
    def __init__(self, bundle: _Optional[bytes] = ...) -> None: ...

class SubmissionStatus(_message.Message):
    __slots__ = ("bundle_id", "state", "site_id", "reason_code", "reason", "received_at", "decided_at", "composite_generation", "conditions")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPOSITE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    state: SubmissionState
    site_id: str
    reason_code: str
    reason: str
    received_at: str
    decided_at: str
    composite_generation: int
    conditions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bundle_id: _Optional[str] = ..., state: _Optional[_Union[SubmissionState, str]] = ..., site_id: _Optional[str] = ..., reason_code: _Optional[str] = ..., reason: _Optional[str] = ..., received_at: _Optional[str] = ..., decided_at: _Optional[str] = ..., composite_generation: _Optional[int] = ..., conditions: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSubmissionStatusRequest(_message.Message):
    __slots__ = ("bundle_id",)
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    def __init__(self, bundle_id: _Optional[str] = ...) -> None: ...

class ListAdaptorsRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class ListAdaptorsResponse(_message.Message):
    __slots__ = ("adaptors",)
    ADAPTORS_FIELD_NUMBER: _ClassVar[int]
    adaptors: _containers.RepeatedCompositeFieldContainer[SubmissionStatus]
    def __init__(self, adaptors: _Optional[_Iterable[_Union[SubmissionStatus, _Mapping]]] = ...) -> None: ...

class ListSitesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteInfo(_message.Message):
    __slots__ = ("site_id", "status", "enrolled_at", "key_fingerprint", "n_adaptors")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    N_ADAPTORS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    status: str
    enrolled_at: str
    key_fingerprint: str
    n_adaptors: int
    def __init__(self, site_id: _Optional[str] = ..., status: _Optional[str] = ..., enrolled_at: _Optional[str] = ..., key_fingerprint: _Optional[str] = ..., n_adaptors: _Optional[int] = ...) -> None: ...

class ListSitesResponse(_message.Message):
    __slots__ = ("sites",)
    SITES_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteInfo]
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteInfo, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "version", "composite_generation", "composite_hash", "coordinator_key_fingerprint")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPOSITE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    COMPOSITE_HASH_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    status: str
    version: str
    composite_generation: int
    composite_hash: str
    coordinator_key_fingerprint: str
    def __init__(self, status: _Optional[str] = ..., version: _Optional[str] = ..., composite_generation: _Optional[int] = ..., composite_hash: _Optional[str] = ..., coordinator_key_fingerprint: _Optional[str] = ...) -> None: ...
