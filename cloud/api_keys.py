"""API keys for downstream users of fine-tuned models (the coordinator's OpenAI-compatible inference).

The model owner decides who may query which job: a key names the jobs it opens, may expire and can be
revoked at once. The secret is shown once when the key is made and only its SHA-256 is stored, so a leaked
database does not let anyone query. A secret is `osk-<key_id>.<random>`: the key id in it lets an owner
tell from a log or a user's report which key is meant, without the secret ever being written down.
No network here: the server calls `authenticate` and `allowed`.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import time

from offsite.cloud.identity import hash_secret
from offsite.cloud.state import ApiKeyRecord, State
from offsite.errors import AuthError, ConfigError

KEY_PREFIX = "osk-"
MAX_SECRET_CHARS = 200     # a real secret is 60; anything longer is refused before it is hashed
TOUCH_INTERVAL_S = 60.0    # last_used is written at most this often per key: a hot key must not write on every request


class UnknownKeyError(AuthError):
    """No key has this secret (or it is not shaped like one)."""


class RevokedKeyError(AuthError):
    """The key was revoked by the model owner."""


class ExpiredKeyError(AuthError):
    """The key's expiry time has passed."""


def create_key(state: State, jobs: list[str], label: str = "", expires_at: float | None = None,
               now: float | None = None) -> tuple[str, ApiKeyRecord]:
    """Make a key that may query `jobs`; returns (secret, record). The secret exists only in the return
    value: the caller shows it once."""
    now = time.time() if now is None else now
    jobs = list(dict.fromkeys(jobs))  # the same job twice is one grant
    if not jobs:
        raise ConfigError("an API key must name at least one job")
    for job_id in jobs:
        state.job(job_id)  # NotFoundError for a job that does not exist
    if expires_at is not None and expires_at <= now:
        raise ConfigError(f"the expiry {format_time(expires_at)} is not in the future")
    key_id = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{key_id}.{secrets.token_urlsafe(32)}"
    record = ApiKeyRecord(key_id, hash_secret(secret), tuple(jobs), label, now, expires_at)
    state.add_api_key(record)
    return secret, record


def authenticate(state: State, secret: str, now: float | None = None) -> ApiKeyRecord:
    """The key this secret belongs to, if it is neither revoked nor expired. Errors never quote the secret."""
    now = time.time() if now is None else now
    if (not isinstance(secret, str) or len(secret) > MAX_SECRET_CHARS or not secret.startswith(KEY_PREFIX)
            or not secret.isascii()):
        raise UnknownKeyError("unknown API key")
    record = state.api_key_by_hash(hash_secret(secret))  # a lookup by SHA-256: nothing to learn from its timing
    if record is None:
        raise UnknownKeyError("unknown API key")
    if record.revoked_at is not None:
        raise RevokedKeyError(f"API key {record.key_id} was revoked")
    if record.expires_at is not None and now >= record.expires_at:
        raise ExpiredKeyError(f"API key {record.key_id} expired at {format_time(record.expires_at)}")
    if record.last_used is None or now - record.last_used >= TOUCH_INTERVAL_S:
        state.touch_api_key(record.key_id, now)
        record = dataclasses.replace(record, last_used=now)
    return record


def allowed(record: ApiKeyRecord, model_id: str) -> bool:
    """Whether this key may query the model of job `model_id` (the inference API's model name is the job id)."""
    return model_id in record.jobs


def key_status(record: ApiKeyRecord, now: float | None = None) -> str:
    """"active", "revoked" or "expired": what `authenticate` would say about the key now."""
    now = time.time() if now is None else now
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and now >= record.expires_at:
        return "expired"
    return "active"


def parse_expiry(text: str) -> float:
    """`2027-01-31` (the key works until that day begins, UTC) or an ISO 8601 time (UTC unless it says
    otherwise), as a Unix time."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--expires must be a date like 2027-01-31 or an ISO 8601 time, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def format_time(t: float | None, never: str = "never") -> str:
    """A Unix time as operators read it, in UTC."""
    if t is None:
        return never
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
