from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token", "signing_public_key", "csr_pem")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    token: str
    signing_public_key: bytes
    csr_pem: bytes
    def __init__(self, token: _Optional[str] = ..., signing_public_key: _Optional[bytes] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("client_id", "certificate_pem", "coordinator_public_key", "job_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    certificate_pem: bytes
    coordinator_public_key: bytes
    job_id: str
    def __init__(self, client_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., coordinator_public_key: _Optional[bytes] = ..., job_id: _Optional[str] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class TrainingSettings(_message.Message):
    __slots__ = ("epochs", "lr", "batch_size", "max_length", "seed", "method", "pack", "grad_accum", "gradient_checkpointing", "privacy", "upload_dtype", "prox_mu", "lr_schedule", "report_heldout")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    REPORT_HELDOUT_FIELD_NUMBER: _ClassVar[int]
    epochs: float
    lr: float
    batch_size: int
    max_length: int
    seed: int
    method: AdapterMethod
    pack: bool
    grad_accum: int
    gradient_checkpointing: bool
    privacy: Privacy
    upload_dtype: str
    prox_mu: float
    lr_schedule: str
    report_heldout: bool
    def __init__(self, epochs: _Optional[float] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., seed: _Optional[int] = ..., method: _Optional[_Union[AdapterMethod, _Mapping]] = ..., pack: _Optional[bool] = ..., grad_accum: _Optional[int] = ..., gradient_checkpointing: _Optional[bool] = ..., privacy: _Optional[_Union[Privacy, _Mapping]] = ..., upload_dtype: _Optional[str] = ..., prox_mu: _Optional[float] = ..., lr_schedule: _Optional[str] = ..., report_heldout: _Optional[bool] = ...) -> None: ...

class AdapterMethod(_message.Message):
    __slots__ = ("name", "r", "alpha", "dropout", "target_modules", "target_r", "orth_reg_weight", "virtual_tokens", "bottleneck_dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    TARGET_R_FIELD_NUMBER: _ClassVar[int]
    ORTH_REG_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    target_r: int
    orth_reg_weight: float
    virtual_tokens: int
    bottleneck_dim: int
    def __init__(self, name: _Optional[str] = ..., r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., target_r: _Optional[int] = ..., orth_reg_weight: _Optional[float] = ..., virtual_tokens: _Optional[int] = ..., bottleneck_dim: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "job_id", "round", "total_rounds", "bundle_manifest_sha256", "adapter_sha256", "skeleton_digest", "training", "retry_after_s", "heartbeat_s", "emulator_patch_sha256")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Task.Kind]
        WAIT: _ClassVar[Task.Kind]
        TRAIN: _ClassVar[Task.Kind]
        DONE: _ClassVar[Task.Kind]
    KIND_UNSPECIFIED: Task.Kind
    WAIT: Task.Kind
    TRAIN: Task.Kind
    DONE: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    SKELETON_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    EMULATOR_PATCH_SHA256_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    job_id: str
    round: int
    total_rounds: int
    bundle_manifest_sha256: str
    adapter_sha256: str
    skeleton_digest: str
    training: TrainingSettings
    retry_after_s: float
    heartbeat_s: float
    emulator_patch_sha256: str
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., bundle_manifest_sha256: _Optional[str] = ..., adapter_sha256: _Optional[str] = ..., skeleton_digest: _Optional[str] = ..., training: _Optional[_Union[TrainingSettings, _Mapping]] = ..., retry_after_s: _Optional[float] = ..., heartbeat_s: _Optional[float] = ..., emulator_patch_sha256: _Optional[str] = ...) -> None: ...

class Privacy(_message.Message):
    __slots__ = ("secure_aggregation", "clip", "equal_weights")
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    EQUAL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    secure_aggregation: bool
    clip: float
    equal_weights: bool
    def __init__(self, secure_aggregation: _Optional[bool] = ..., clip: _Optional[float] = ..., equal_weights: _Optional[bool] = ...) -> None: ...

class BlobInfoRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class BlobInfo(_message.Message):
    __slots__ = ("sha256", "size", "chunk_size", "chunk_sha256")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    chunk_size: int
    chunk_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., chunk_size: _Optional[int] = ..., chunk_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("sha256", "first_chunk")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    first_chunk: int
    def __init__(self, sha256: _Optional[str] = ..., first_chunk: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("job_id", "round", "num_examples", "size", "sha256", "train_loss", "heldout_loss")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_LOSS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    num_examples: int
    size: int
    sha256: str
    train_loss: float
    heldout_loss: float
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., train_loss: _Optional[float] = ..., heldout_loss: _Optional[float] = ...) -> None: ...

class UploadSession(_message.Message):
    __slots__ = ("upload_id", "offset", "chunk_size")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    chunk_size: int
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class UploadPart(_message.Message):
    __slots__ = ("upload_id", "offset", "data")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    data: bytes
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadResult(_message.Message):
    __slots__ = ("upload_id", "offset", "accepted", "round", "updates_in_round")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPDATES_IN_ROUND_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    accepted: bool
    round: int
    updates_in_round: int
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., accepted: _Optional[bool] = ..., round: _Optional[int] = ..., updates_in_round: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("job_id", "round", "activity", "progress", "failure")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    activity: str
    progress: float
    failure: str
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., activity: _Optional[str] = ..., progress: _Optional[float] = ..., failure: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("round_open",)
    ROUND_OPEN_FIELD_NUMBER: _ClassVar[int]
    round_open: bool
    def __init__(self, round_open: _Optional[bool] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("job_id", "round", "advert", "shares", "reveal")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ADVERT_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    REVEAL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    advert: SecAggAdvert
    shares: SecAggShares
    reveal: SecAggReveal
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., advert: _Optional[_Union[SecAggAdvert, _Mapping]] = ..., shares: _Optional[_Union[SecAggShares, _Mapping]] = ..., reveal: _Optional[_Union[SecAggReveal, _Mapping]] = ...) -> None: ...

class SecAggAdvert(_message.Message):
    __slots__ = ("cipher_public_key", "mask_public_key", "signature")
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    cipher_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    def __init__(self, cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SealedShares(_message.Message):
    __slots__ = ("sender", "recipient", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("sealed",)
    SEALED_FIELD_NUMBER: _ClassVar[int]
    sealed: _containers.RepeatedCompositeFieldContainer[SealedShares]
    def __init__(self, sealed: _Optional[_Iterable[_Union[SealedShares, _Mapping]]] = ...) -> None: ...

class ShamirShare(_message.Message):
    __slots__ = ("index", "value")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    index: int
    value: bytes
    def __init__(self, index: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...

class SecAggReveal(_message.Message):
    __slots__ = ("seed_shares", "key_shares")
    class SeedSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ShamirShare
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ShamirShare, _Mapping]] = ...) -> None: ...
    class KeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ShamirShare
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ShamirShare, _Mapping]] = ...) -> None: ...
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    seed_shares: _containers.MessageMap[str, ShamirShare]
    key_shares: _containers.MessageMap[str, ShamirShare]
    def __init__(self, seed_shares: _Optional[_Mapping[str, ShamirShare]] = ..., key_shares: _Optional[_Mapping[str, ShamirShare]] = ...) -> None: ...

class RosterEntry(_message.Message):
    __slots__ = ("client_id", "cipher_public_key", "mask_public_key", "signature", "identity_public_key")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    cipher_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    identity_public_key: bytes
    def __init__(self, client_id: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., identity_public_key: _Optional[bytes] = ...) -> None: ...

class SecAggState(_message.Message):
    __slots__ = ("stage", "retry_after_s", "roster", "threshold", "inbox", "survivors", "length", "max_clients")
    class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STAGE_UNSPECIFIED: _ClassVar[SecAggState.Stage]
        ADVERTISE: _ClassVar[SecAggState.Stage]
        SHARE_KEYS: _ClassVar[SecAggState.Stage]
        MASK: _ClassVar[SecAggState.Stage]
        UNMASK: _ClassVar[SecAggState.Stage]
        DONE: _ClassVar[SecAggState.Stage]
    STAGE_UNSPECIFIED: SecAggState.Stage
    ADVERTISE: SecAggState.Stage
    SHARE_KEYS: SecAggState.Stage
    MASK: SecAggState.Stage
    UNMASK: SecAggState.Stage
    DONE: SecAggState.Stage
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    stage: SecAggState.Stage
    retry_after_s: float
    roster: _containers.RepeatedCompositeFieldContainer[RosterEntry]
    threshold: int
    inbox: _containers.RepeatedCompositeFieldContainer[SealedShares]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    length: int
    max_clients: int
    def __init__(self, stage: _Optional[_Union[SecAggState.Stage, str]] = ..., retry_after_s: _Optional[float] = ..., roster: _Optional[_Iterable[_Union[RosterEntry, _Mapping]]] = ..., threshold: _Optional[int] = ..., inbox: _Optional[_Iterable[_Union[SealedShares, _Mapping]]] = ..., survivors: _Optional[_Iterable[str]] = ..., length: _Optional[int] = ..., max_clients: _Optional[int] = ...) -> None: ...
