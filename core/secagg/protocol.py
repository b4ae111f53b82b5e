"""The secure-aggregation protocol of Bonawitz et al. (CCS 2017), one run per round, as two plain
objects: `SecAggClient` (one per client) and `SecAggServer` (the coordinator). They exchange the
dataclasses below; the coordinator relays every client-to-client message and learns only the sum.

    1 advertise   each client: two fresh X25519 keys (one to encrypt shares, one to agree masks), signed
                  with its Ed25519 identity key. The server closes the roster U1 (>= t clients).
    2 share keys  each client: a fresh self-mask seed b_u; Shamir-shares b_u and its mask private key,
                  t of |U1|, one share per roster member, each encrypted (AES-GCM under an X25519 +
                  HKDF key) to its recipient. The server closes U2 = the clients that sent shares.
    3 mask        each client in U2: y_u = x_u + PRG(b_u) + sum over v in U2 of +-PRG(s_uv) mod 2^64,
                  s_uv agreed by X25519 (+ if u < v, - otherwise: pair masks cancel in the sum).
                  The server closes U3 = the clients that sent y_u.
    4 unmask      each client in U3: for every v in U2, its share of b_v if v is in U3, else its share
                  of v's mask key, never both for one v (a client refuses a second, different list).
                  With t of them the server rebuilds the self-masks of U3 and the pair masks that the
                  dropped clients of U2 \\ U3 left in, removes them, and decodes the sum over U3.

A stage left with fewer than t clients raises AbortedError and the run ends without a sum (there is
no fallback to plain aggregation). Threat model: an honest-but-curious coordinator (it follows the protocol but reads
everything it relays) and other clients; keys are bound to identities only through the coordinator's
roster, so an actively malicious coordinator that invents clients is out of scope, as in the paper's
semi-honest variant. Masks are ChaCha20 keystreams (offsite.csprng); every primitive is from
`cryptography`, Shamir from PyCryptodome.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from offsite import csprng
from offsite.errors import AbortedError, AlreadyExistsError, AuthError, InvalidRequestError, PreconditionError
from offsite.secagg import encoding, shamir

RAW = dict(encoding=Encoding.Raw, format=PublicFormat.Raw)


def context(job_id: str, round_: int) -> bytes:
    """Binds every signature, key derivation and ciphertext of a run to its job and round."""
    return f"offsite-secagg/1|{job_id}|{round_}".encode()


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _agree(private: X25519PrivateKey, public: bytes, ctx: bytes, purpose: str, a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    return _kdf(private.exchange(X25519PublicKey.from_public_bytes(public)), b"|".join([ctx, purpose.encode(), low.encode(), high.encode()]))


def _sign_bytes(ctx: bytes, client_id: str, cipher_pk: bytes, mask_pk: bytes) -> bytes:
    return b"|".join([ctx, b"advert", client_id.encode(), cipher_pk, mask_pk])


def _pair_mask(seed: bytes, length: int, me: str, other: str) -> np.ndarray:
    mask = csprng.uint64s(seed, length)
    return mask if me < other else (np.uint64(0) - mask)  # + for the lower id, - for the higher: they cancel


@dataclass(frozen=True)
class Advert:
    client_id: str
    cipher_pk: bytes   # X25519: shares are encrypted under keys agreed with it
    mask_pk: bytes     # X25519: pair masks are expanded from keys agreed with it
    signature: bytes   # Ed25519 by the client's identity key over context, id and both keys


@dataclass(frozen=True)
class SealedShares:
    sender: str
    recipient: str
    ciphertext: bytes  # nonce | AES-GCM of (index, share of sender's b, share of sender's mask key)


@dataclass(frozen=True)
class Reveal:
    client_id: str
    seed_shares: dict[str, shamir.Share]  # survivor -> this client's share of the survivor's self-mask seed
    key_shares: dict[str, shamir.Share]   # dropped -> this client's share of the dropped one's mask key


class SecAggClient:
    """One client's side of one run. Holds its secrets in memory only."""

    def __init__(self, client_id: str, signer: Ed25519PrivateKey, ctx: bytes):
        self.id, self.ctx, self.t = client_id, ctx, 0
        self._signer = signer
        self._cipher, self._mask = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._seed = csprng.new_seed()
        self._roster: dict[str, Advert] = {}
        self._held: dict[str, tuple[int, bytes, bytes]] = {}  # sender -> (index, share of b, share of mask key)
        self._u2: list[str] = []
        self._revealed_for: tuple[str, ...] | None = None

    def advertise(self) -> Advert:
        cipher_pk, mask_pk = self._cipher.public_key().public_bytes(**RAW), self._mask.public_key().public_bytes(**RAW)
        return Advert(self.id, cipher_pk, mask_pk, self._signer.sign(_sign_bytes(self.ctx, self.id, cipher_pk, mask_pk)))

    def share_keys(self, roster: list[Advert], identity_keys: dict[str, bytes], threshold: int) -> list[SealedShares]:
        """Check the roster's signatures, then share b_u and the mask key among it, `threshold` of n."""
        self.t = threshold
        ids = [a.client_id for a in roster]
        if len(set(ids)) != len(ids) or self.id not in ids:
            raise InvalidRequestError("the roster repeats a client or leaves this one out")
        if not 2 <= self.t <= len(ids):
            raise AbortedError(f"a roster of {len(ids)} cannot share secrets {self.t} of n (needs 2 <= t <= n)")
        for a in roster:
            try:
                Ed25519PublicKey.from_public_bytes(identity_keys[a.client_id]).verify(
                    a.signature, _sign_bytes(self.ctx, a.client_id, a.cipher_pk, a.mask_pk))
            except (KeyError, InvalidSignature):
                raise AuthError(f"roster entry of {a.client_id} is not signed by that client") from None
        self._roster = {a.client_id: a for a in roster}
        order = sorted(ids)
        mask_key = self._mask.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        seed_shares, key_shares = shamir.split(self._seed, self.t, len(order)), shamir.split(mask_key, self.t, len(order))
        out = []
        for (x, b), (_, k), v in zip(seed_shares, key_shares, order):
            if v == self.id:
                self._held[self.id] = (x, b, k)
                continue
            key = _agree(self._cipher, self._roster[v].cipher_pk, self.ctx, "shares", self.id, v)
            nonce = secrets.token_bytes(12)
            plain = x.to_bytes(4, "big") + b + k
            out.append(SealedShares(self.id, v, nonce + AESGCM(key).encrypt(nonce, plain, self._ad(self.id, v))))
        return out

    def _ad(self, sender: str, recipient: str) -> bytes:
        return b"|".join([self.ctx, b"shares", sender.encode(), recipient.encode()])

    def mask(self, inbox: list[SealedShares], values: np.ndarray, max_clients: int) -> np.ndarray:
        """Open the shares sent to this client (their senders are U2), then mask `values` (float64)."""
        for s in inbox:
            if s.recipient != self.id or s.sender not in self._roster or s.sender in self._held:
                raise InvalidRequestError(f"unexpected share from {s.sender} to {s.recipient}")
            key = _agree(self._cipher, self._roster[s.sender].cipher_pk, self.ctx, "shares", s.sender, self.id)
            try:
                plain = AESGCM(key).decrypt(s.ciphertext[:12], s.ciphertext[12:], self._ad(s.sender, self.id))
            except InvalidTag:
                raise AuthError(f"shares from {s.sender} do not decrypt: altered or not for this run") from None
            self._held[s.sender] = (int.from_bytes(plain[:4], "big"), plain[4:36], plain[36:68])
        self._u2 = sorted(self._held)
        if len(self._u2) < self.t:
            raise AbortedError(f"{len(self._u2)} clients shared keys, below the threshold {self.t}")
        y = encoding.encode(values, max_clients) + csprng.uint64s(self._seed, len(values))
        for v in self._u2:
            if v != self.id:
                seed = _agree(self._mask, self._roster[v].mask_pk, self.ctx, "mask", self.id, v)
                y = y + _pair_mask(seed, len(values), self.id, v)
        return y

    def reveal(self, survivors: list[str]) -> Reveal:
        """Shares that unmask the survivors' sum; refuses a second, different list (that could expose
        both masks of one client)."""
        alive = tuple(sorted(set(survivors)))
        if self._revealed_for is not None and self._revealed_for != alive:
            raise InvalidRequestError("asked to reveal for a second, different set of survivors")
        if not set(alive) <= set(self._u2) or self.id not in alive:
            raise InvalidRequestError("survivors must be clients that shared keys, this one included")
        if len(alive) < self.t:
            raise AbortedError(f"{len(alive)} survivors, below the threshold {self.t}")
        self._revealed_for = alive
        seeds = {v: (self._held[v][0], self._held[v][1]) for v in self._u2 if v in alive}
        keys = {v: (self._held[v][0], self._held[v][2]) for v in self._u2 if v not in alive}
        return Reveal(self.id, seeds, keys)


@dataclass
class SecAggServer:
    """The coordinator's side of one run: relays, and removes the masks from the sum."""

    ctx: bytes
    threshold: int
    length: int            # values per input
    max_clients: int       # the bound `encoding` was told: the most inputs that will be summed
    adverts: dict[str, Advert] = field(default_factory=dict)
    shares: dict[str, list[SealedShares]] = field(default_factory=dict)
    masked: set[str] = field(default_factory=set)   # U3 so far; their inputs are summed as they come
    total: np.ndarray | None = None
    reveals: dict[str, Reveal] = field(default_factory=dict)
    stage: int = 1

    def _need(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise AbortedError(f"secure aggregation aborted: {count} {what}, below the threshold {self.threshold}")

    def _expect(self, stage: int, client_id: str, among) -> None:
        if self.stage != stage:
            raise PreconditionError(f"secure aggregation is at stage {self.stage}, not {stage}")
        if among is not None and client_id not in among:
            raise PreconditionError(f"{client_id} is not part of this stage of secure aggregation")

    def add_advert(self, a: Advert) -> None:
        self._expect(1, a.client_id, None)
        self.adverts[a.client_id] = a

    def close_adverts(self) -> list[Advert]:
        self._expect(1, "", None)
        self._need(len(self.adverts), "clients advertised keys")
        self.stage = 2
        return [self.adverts[k] for k in sorted(self.adverts)]

    def add_shares(self, sender: str, sealed: list[SealedShares]) -> None:
        self._expect(2, sender, self.adverts)
        recipients = sorted(s.recipient for s in sealed)
        if any(s.sender != sender for s in sealed) or recipients != sorted(set(self.adverts) - {sender}):
            raise InvalidRequestError(f"{sender} must send one share set to every other client of the roster")
        self.shares[sender] = sealed

    def close_shares(self) -> list[str]:
        self._expect(2, "", None)
        self._need(len(self.shares), "clients shared keys")
        self.stage = 3
        return sorted(self.shares)

    def inbox(self, recipient: str) -> list[SealedShares]:
        """What `recipient` opens in stage 3: the shares sent to it by the clients of U2."""
        self._expect(3, recipient, self.shares)
        return [s for sender in sorted(self.shares) for s in self.shares[sender] if s.recipient == recipient]

    def add_masked(self, client_id: str, y: np.ndarray) -> None:
        self._expect(3, client_id, self.shares)
        if y.dtype != np.uint64 or y.shape != (self.length,):
            raise InvalidRequestError(f"masked input must be {self.length} uint64 values")
        if client_id in self.masked:
            raise AlreadyExistsError(f"{client_id} already sent its masked input")
        self.total = y.copy() if self.total is None else self.total + y
        self.masked.add(client_id)

    def close_masked(self) -> list[str]:
        self._expect(3, "", None)
        self._need(len(self.masked), "clients sent masked inputs")
        self.stage = 4
        return sorted(self.masked)

    def add_reveal(self, r: Reveal) -> None:
        self._expect(4, r.client_id, self.masked)
        if set(r.seed_shares) != set(self.masked) or set(r.key_shares) != set(self.shares) - set(self.masked):
            raise InvalidRequestError(f"{r.client_id} revealed for the wrong clients")
        self.reveals[r.client_id] = r

    def unmask(self) -> np.ndarray:
        """The float64 sum of the survivors' inputs."""
        self._expect(4, "", None)
        self._need(len(self.reveals), "clients revealed shares")
        total = self.total
        for u in sorted(self.masked):  # self-masks of the survivors
            seed = shamir.combine([r.seed_shares[u] for r in self.reveals.values()], self.threshold)
            total = total - csprng.uint64s(seed, self.length)
        for v in sorted(set(self.shares) - set(self.masked)):  # pair masks the dropped clients left in
            key = X25519PrivateKey.from_private_bytes(shamir.combine([r.key_shares[v] for r in self.reveals.values()], self.threshold))
            for u in self.masked:
                seed = _agree(key, self.adverts[u].mask_pk, self.ctx, "mask", v, u)
                total = total - _pair_mask(seed, self.length, u, v)
        self.stage = 5
        return encoding.decode(total)
