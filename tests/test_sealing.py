"""Sealed updates: round trip, and every tampering the coordinator must catch."""
import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from offsite.errors import InvalidUpdateError
from offsite.sealing import SealContext, open_sealed, seal

CTX = SealContext("job", 3, "client-1", "ab" * 32)
PAYLOAD = b"adapter tensors" * 100


@pytest.fixture
def keys():
    return X25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def test_round_trip(keys):
    coord, client = keys
    envelope = seal(PAYLOAD, CTX, coord.public_key(), client)
    assert PAYLOAD not in envelope
    assert open_sealed(envelope, CTX, coord, client.public_key()) == PAYLOAD


def test_two_seals_of_the_same_payload_differ(keys):
    coord, client = keys
    assert seal(PAYLOAD, CTX, coord.public_key(), client) != seal(PAYLOAD, CTX, coord.public_key(), client)


@pytest.mark.parametrize("position, check", [(20, "signature"), (50, "signature"), (60, "decrypt"), (200, "decrypt"),
                                             (-70, "signature"), (-10, "signature")])
def test_flipped_bit_is_rejected(keys, position, check):
    """Header, tag and signature bits break the signature; ciphertext bits break the GCM tag."""
    coord, client = keys
    envelope = bytearray(seal(PAYLOAD, CTX, coord.public_key(), client))
    envelope[position] ^= 0x01
    with pytest.raises(InvalidUpdateError, match=check):
        open_sealed(bytes(envelope), CTX, coord, client.public_key())


def test_wrong_signer_is_rejected(keys):
    coord, client = keys
    envelope = seal(PAYLOAD, CTX, coord.public_key(), Ed25519PrivateKey.generate())
    with pytest.raises(InvalidUpdateError, match="signature"):
        open_sealed(envelope, CTX, coord, client.public_key())


@pytest.mark.parametrize("change", [{"round": 4}, {"job_id": "other"}, {"client_id": "client-2"}, {"skeleton_digest": "cd" * 32}])
def test_update_bound_to_its_context(keys, change):
    coord, client = keys
    envelope = seal(PAYLOAD, CTX, coord.public_key(), client)
    with pytest.raises(InvalidUpdateError):
        open_sealed(envelope, dataclasses.replace(CTX, **change), coord, client.public_key())


def test_sealed_to_another_coordinator_does_not_open(keys):
    coord, client = keys
    envelope = seal(PAYLOAD, CTX, X25519PrivateKey.generate().public_key(), client)
    with pytest.raises(InvalidUpdateError, match="decrypt"):
        open_sealed(envelope, CTX, coord, client.public_key())


def test_truncated_envelope_is_malformed(keys):
    coord, client = keys
    with pytest.raises(InvalidUpdateError, match="malformed"):
        open_sealed(b"short", CTX, coord, client.public_key())
