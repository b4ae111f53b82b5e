"""Wire conversions in one place: every field of every message a client sends is bounded here before any
of it is used, and replies are built here from the coordinator's plain records.

`RULES` holds one rule per field of every request message (and of the messages nested in them);
`uncovered()` lists fields without one, so a field added to the proto without a bound fails the server's
start and a test. Bounds here are what the wire may carry at all; what a given job allows (its rounds,
its update size, its example bound) is checked by the coordinator.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from offsite.cloud.intake import UploadHeader
from offsite.cloud.job import MAX_EXAMPLES, MAX_ROUNDS
from offsite.cloud.tasks import Task
from offsite.errors import InvalidRequestError, shown
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.transport import MAX_MESSAGE_BYTES

MAX_BLOB_BYTES = 2**40         # sizes and offsets
MAX_ROSTER = 10_000            # clients in one secure-aggregation run
ID_CHARS = 160                 # client ids (a name from `cloud init` and 9 more characters)


@dataclass(frozen=True)
class Text:
    max_chars: int
    pattern: str | None = None        # the whole string must match; an empty string is checked too

    def check(self, value: str) -> str | None:
        if len(value) > self.max_chars:
            return f"is {len(value)} characters long, at most {self.max_chars} allowed"
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return f"{shown(value)} is not of the form {self.pattern}"
        return None


@dataclass(frozen=True)
class Blob:
    max_bytes: int
    exact: bool = False               # exactly max_bytes long

    def check(self, value: bytes) -> str | None:
        if self.exact and len(value) != self.max_bytes:
            return f"must be exactly {self.max_bytes} bytes, got {len(value)}"
        if len(value) > self.max_bytes:
            return f"is {len(value)} bytes long, at most {self.max_bytes} allowed"
        return None


@dataclass(frozen=True)
class Count:
    lo: int
    hi: int

    def check(self, value: int) -> str | None:
        return None if self.lo <= value <= self.hi else f"must be in {self.lo}..{self.hi}, got {shown(value, 24)}"


@dataclass(frozen=True)
class Real:
    lo: float
    hi: float

    def check(self, value: float) -> str | None:
        if math.isfinite(value) and self.lo <= value <= self.hi:
            return None
        return f"must be a finite number in [{self.lo:g}, {self.hi:g}], got {value!r:.24}"


@dataclass(frozen=True)
class Each:
    """A repeated or map field of messages: at most `max_items`, each checked by its own message's rules
    (and a map's keys by `key`)."""
    max_items: int
    key: Text | None = None


@dataclass(frozen=True)
class Nested:
    """A singular message field: checked by its own message's rules."""


@dataclass(frozen=True)
class Any_:
    """No bound is needed (a bool)."""

    def check(self, value: object) -> str | None:
        return None


Rule = Text | Blob | Count | Real | Each | Nested | Any_
_JOB_ID = r"[A-Za-z0-9_-]*"
_SHA256 = r"[0-9a-f]{64}"
_ROUND = Count(0, MAX_ROUNDS)
_CLIENT = Text(ID_CHARS)

RULES: dict[str, dict[str, Rule]] = {
    "EnrollRequest": {"token": Text(256), "signing_public_key": Blob(32, exact=True), "csr_pem": Blob(16 << 10)},
    "GetTaskRequest": {"job_id": Text(64, _JOB_ID)},
    "BlobInfoRequest": {"sha256": Text(64, _SHA256)},
    "DownloadRequest": {"sha256": Text(64, _SHA256), "first_chunk": Count(0, 2**31)},
    "UploadHeader": {"job_id": Text(64, _JOB_ID), "round": _ROUND, "num_examples": Count(1, MAX_EXAMPLES),
                     "size": Count(1, MAX_BLOB_BYTES), "sha256": Text(64, _SHA256), "train_loss": Real(0.0, 1e6),
                     "heldout_loss": Real(0.0, 1e6)},
    "UploadPart": {"upload_id": Text(32, r"[0-9a-f]{32}"), "offset": Count(0, MAX_BLOB_BYTES),
                   "data": Blob(MAX_MESSAGE_BYTES)},
    "HeartbeatRequest": {"job_id": Text(64, _JOB_ID), "round": _ROUND, "activity": Text(64), "progress": Real(0.0, 1.0),
                         "failure": Text(240)},
    "SecAggRequest": {"job_id": Text(64, _JOB_ID), "round": _ROUND, "advert": Nested(), "shares": Nested(),
                      "reveal": Nested()},
    "SecAggAdvert": {"cipher_public_key": Blob(32, exact=True), "mask_public_key": Blob(32, exact=True),
                     "signature": Blob(64, exact=True)},
    "SecAggShares": {"sealed": Each(MAX_ROSTER)},
    "SealedShares": {"sender": _CLIENT, "recipient": _CLIENT, "ciphertext": Blob(256)},
    "SecAggReveal": {"seed_shares": Each(MAX_ROSTER, key=_CLIENT), "key_shares": Each(MAX_ROSTER, key=_CLIENT)},
    "ShamirShare": {"index": Count(1, MAX_ROSTER), "value": Blob(32, exact=True)},
}
REQUESTS = tuple(m.input_type for m in pb.DESCRIPTOR.services_by_name["Coordinator"].methods)


def _nested(field: FieldDescriptor) -> Descriptor | None:
    """The message type a field holds (a map's value type for a map), or None for a scalar."""
    if field.message_type is None:
        return None
    if field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return value.message_type
    return field.message_type


def uncovered() -> list[str]:
    """Fields of request messages (and messages nested in them) that have no rule."""
    missing, seen, todo = [], set(), list(REQUESTS)
    while todo:
        d = todo.pop()
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        rules = RULES.get(d.name, {})
        for f in d.fields:
            if f.name not in rules and f.type != FieldDescriptor.TYPE_BOOL:
                missing.append(f"{d.name}.{f.name}")
            if _nested(f) is not None:
                todo.append(_nested(f))
    return sorted(missing)


def check(message: Message) -> None:
    """Raise InvalidRequestError naming the first field outside its bound."""
    d = message.DESCRIPTOR
    rules = RULES.get(d.name, {})
    for f in d.fields:
        rule = rules.get(f.name, Any_())
        value = getattr(message, f.name)
        where = f"{d.name}.{f.name}"
        if isinstance(rule, Each):
            if len(value) > rule.max_items:
                raise InvalidRequestError(f"{where} has {len(value)} entries, at most {rule.max_items} allowed")
            if rule.key is not None:
                for key in value:
                    _fail(where + " key", rule.key.check(key))
            for item in (value.values() if rule.key is not None else value):
                check(item)
        elif isinstance(rule, Nested):
            if message.HasField(f.name):
                check(value)
        else:
            _fail(where, rule.check(value))


def _fail(where: str, problem: str | None) -> None:
    if problem is not None:
        raise InvalidRequestError(f"{where} {problem}")


# --- messages to the coordinator's records, and back ------------------------------------------------

def upload_header(request: pb.UploadHeader) -> UploadHeader:
    return UploadHeader(request.job_id, request.round, request.num_examples, request.size, request.sha256,
                        request.train_loss if request.HasField("train_loss") else None,
                        request.heldout_loss if request.HasField("heldout_loss") else None)


_KINDS = {"wait": pb.Task.WAIT, "train": pb.Task.TRAIN, "done": pb.Task.DONE}


def task_message(task: Task) -> pb.Task:
    msg = pb.Task(kind=_KINDS[task.kind], job_id=task.job_id, round=task.round, total_rounds=task.total_rounds,
                  bundle_manifest_sha256=task.bundle_manifest_sha256, adapter_sha256=task.adapter_sha256,
                  skeleton_digest=task.skeleton_digest, retry_after_s=task.retry_after_s,
                  heartbeat_s=task.heartbeat_s, emulator_patch_sha256=task.emulator_patch_sha256)
    if task.config is not None:
        c = task.config
        m = c.method_config()
        method = pb.AdapterMethod(**m.to_dict())  # the same field names on both sides
        msg.training.CopyFrom(pb.TrainingSettings(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size,
                                                  max_length=c.max_length, seed=c.seed, method=method, pack=c.pack,
                                                  grad_accum=c.grad_accum, gradient_checkpointing=c.gradient_checkpointing,
                                                  privacy=privacy_message(c), upload_dtype=task.upload_dtype,
                                                  prox_mu=c.prox_mu, lr_schedule=c.lr_schedule,
                                                  report_heldout=c.report_heldout))
    return msg


def privacy_message(c) -> pb.Privacy:
    """Under secure aggregation the coordinator cannot clip or bound single updates: the client clips to
    the DP bound, or to the job's norm bound."""
    dp = c.dp_config()
    clip = (c.dp_clip or c.max_update_norm) if c.secure_aggregation else 0.0
    equal = dp.enabled or (c.secure_aggregation and c.weighting == "equal")  # else the coordinator weighs plain updates
    return pb.Privacy(secure_aggregation=c.secure_aggregation, clip=clip, equal_weights=equal)


def roster_entry(advert, identity_key: bytes) -> pb.RosterEntry:
    return pb.RosterEntry(client_id=advert.client_id, cipher_public_key=advert.cipher_pk, mask_public_key=advert.mask_pk,
                          signature=advert.signature, identity_public_key=identity_key)
