"""Every field of every request message is bounded before use (offsite.cloud.serde), table-driven from the
proto's own descriptors: a field added without a bound, or a bound that lets a hostile value through,
fails here."""
import math

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from offsite import chunks
from offsite.cloud import serde
from offsite.errors import InvalidRequestError
from offsite.protos.offsite.v1 import coordinator_pb2 as pb

F = FieldDescriptor


def _messages():
    """Every request message type and every message nested in one, found from the descriptors."""
    seen, todo = {}, list(serde.REQUESTS)
    while todo:
        d = todo.pop()
        if d.full_name not in seen:
            seen[d.full_name] = d
            todo.extend(serde._nested(f) for f in d.fields if serde._nested(f) is not None)
    return sorted(seen.values(), key=lambda d: d.name)


def _hostile(field: FieldDescriptor) -> list:
    """Values of the field's wire type that no field of this protocol may carry."""
    return {F.TYPE_STRING: ["x" * 10_000], F.TYPE_BYTES: [b"\0" * (9 << 20)],
            F.TYPE_UINT32: [2**32 - 1], F.TYPE_UINT64: [2**64 - 1, 2**63],
            F.TYPE_DOUBLE: [math.nan, math.inf, -math.inf, -1.0, 1e300]}.get(field.type, [])


VALID = [  # what the project's own client sends, at the edges of each bound
    pb.EnrollRequest(token="t" * 43, signing_public_key=b"k" * 32, csr_pem=b"-" * 2000),
    pb.GetTaskRequest(job_id=""), pb.GetTaskRequest(job_id="support-bot_2"),
    pb.BlobInfoRequest(sha256="ab" * 32), pb.DownloadRequest(sha256="0" * 64, first_chunk=2**31),
    pb.UploadHeader(job_id="j", round=serde.MAX_ROUNDS, num_examples=1, size=1, sha256="f" * 64, train_loss=0.0),
    pb.UploadHeader(job_id="j", round=0, num_examples=serde.MAX_EXAMPLES, size=serde.MAX_BLOB_BYTES, sha256="f" * 64),
    pb.UploadPart(upload_id="a" * 32, offset=0, data=b"x" * (1 << 20)),
    pb.HeartbeatRequest(job_id="j", round=3, activity="training", progress=1.0),
    pb.SecAggRequest(job_id="j", round=1, advert=pb.SecAggAdvert(cipher_public_key=b"c" * 32, mask_public_key=b"m" * 32,
                                                                  signature=b"s" * 64)),
    pb.SecAggRequest(job_id="j", shares=pb.SecAggShares(sealed=[pb.SealedShares(sender="a-1", recipient="b-2",
                                                                                ciphertext=b"c" * 96)] * 3)),
    pb.SecAggRequest(job_id="j", reveal=pb.SecAggReveal(seed_shares={"a-1": pb.ShamirShare(index=1, value=b"v" * 32)},
                                                        key_shares={"b-2": pb.ShamirShare(index=2, value=b"w" * 32)})),
]


def _bases() -> dict:
    """A valid instance of every message type, found inside the VALID requests."""
    found, todo = {}, list(VALID)
    while todo:
        m = todo.pop(0)
        found.setdefault(m.DESCRIPTOR.name, m)
        for f, value in m.ListFields():
            if f.message_type is not None:
                items = value.values() if f.message_type.GetOptions().map_entry else value if f.is_repeated else [value]
                todo.extend(items)
    return found


BASE = _bases()
CASES = [(d.name, f.name, value) for d in _messages() for f in d.fields if f.message_type is None
         for value in _hostile(f)]


def test_every_request_field_has_a_bound_and_every_scalar_is_tried():
    assert serde.uncovered() == []
    tried = {(m, f) for m, f, _ in CASES}
    scalars = {(d.name, f.name) for d in _messages() for f in d.fields if f.message_type is None and f.type != F.TYPE_BOOL}
    assert tried == scalars and len(scalars) >= 30
    assert set(BASE) == {d.name for d in _messages()}  # a valid instance of every type to start from


@pytest.mark.parametrize("message, field, value", CASES, ids=[f"{m}.{f}={str(v)[:12]}" for m, f, v in CASES])
def test_a_hostile_value_in_any_field_is_refused_naming_the_field_briefly(message, field, value):
    msg = type(BASE[message])()
    msg.CopyFrom(BASE[message])  # valid but for the one field
    setattr(msg, field, value)
    with pytest.raises(InvalidRequestError) as err:
        serde.check(msg)
    assert f"{message}.{field}" in str(err.value) and len(str(err.value)) < 200




@pytest.mark.parametrize("message", VALID, ids=[f"{type(m).__name__}-{i}" for i, m in enumerate(VALID)])
def test_what_a_real_client_sends_passes(message):
    serde.check(message)


@pytest.mark.parametrize("message, where", [
    (pb.UploadHeader(job_id="j", num_examples=0, size=1, sha256="f" * 64), "UploadHeader.num_examples"),
    (pb.UploadHeader(job_id="j", num_examples=1, size=0, sha256="f" * 64), "UploadHeader.size"),  # never a seal
    (pb.UploadHeader(job_id="../etc", num_examples=1, size=1, sha256="f" * 64), "UploadHeader.job_id"),
    (pb.UploadHeader(job_id="j", num_examples=1, size=1, sha256="F" * 64), "UploadHeader.sha256"),
    (pb.UploadHeader(job_id="j", num_examples=1, size=1, sha256="f" * 64, train_loss=1e17), "UploadHeader.train_loss"),
    (pb.UploadHeader(job_id="j", round=serde.MAX_ROUNDS + 1, num_examples=1, size=1, sha256="f" * 64), "UploadHeader.round"),
    (pb.BlobInfoRequest(sha256=""), "BlobInfoRequest.sha256"),
    (pb.UploadPart(upload_id="", offset=0), "UploadPart.upload_id"),
    (pb.HeartbeatRequest(progress=1.5), "HeartbeatRequest.progress"),
    (pb.EnrollRequest(signing_public_key=b"short"), "EnrollRequest.signing_public_key"),
    (pb.SecAggRequest(shares=pb.SecAggShares(sealed=[pb.SealedShares(ciphertext=b"c" * 257)])), "SealedShares.ciphertext"),
    (pb.SecAggRequest(shares=pb.SecAggShares(sealed=[pb.SealedShares()] * (serde.MAX_ROSTER + 1))), "SecAggShares.sealed"),
    (pb.SecAggRequest(reveal=pb.SecAggReveal(seed_shares={"a": pb.ShamirShare(index=0, value=b"v" * 32)})), "ShamirShare.index"),
    (pb.SecAggRequest(reveal=pb.SecAggReveal(key_shares={"k" * 200: pb.ShamirShare(index=1, value=b"v" * 32)})),
     "SecAggReveal.key_shares key"),
    (pb.SecAggRequest(advert=pb.SecAggAdvert(cipher_public_key=b"c" * 31, mask_public_key=b"m" * 32, signature=b"s" * 64)),
     "SecAggAdvert.cipher_public_key"),
])
def test_edges_and_nested_fields(message, where):
    with pytest.raises(InvalidRequestError, match=where.replace(".", r"\.")):
        serde.check(message)


@pytest.mark.parametrize("index, size", [(0, 1), (1, 127), (127, 128), (128, 1 << 20), (2**31, 3)])
def test_a_chunk_written_and_read_by_hand_is_protobufs_own_encoding(index, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw = chunks.encode(index, data)
    assert raw == pb.Chunk(index=index, data=data).SerializeToString()
    got = chunks.decode(raw)
    assert (got.index, bytes(got.data)) == (index, data) and isinstance(got.data, memoryview)  # no copy


@pytest.mark.parametrize("message", [
    pb.Chunk(data=b"abc"), pb.Chunk(index=3), pb.Chunk(), pb.Chunk(index=2**31, data=b"x" * 300)])
def test_a_chunk_in_any_valid_layout_reads_as_protobuf_reads_it(message):
    raw = message.SerializeToString()
    for layout in (raw, b"\x12\x01z" + raw, raw + b"\x08\x07"):  # a field twice: the last one counts
        expected = pb.Chunk.FromString(layout)
        got = chunks.decode(layout)
        assert (got.index, bytes(got.data)) == (expected.index, expected.data)


def test_a_truncated_chunk_is_refused_like_protobuf_refuses_it():
    raw = chunks.encode(5, b"x" * 200)
    with pytest.raises(DecodeError):
        chunks.decode(raw[:-1])
