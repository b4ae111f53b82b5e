"""The coordinator's durable state behind one interface, in SQLite (default) or PostgreSQL.

Every method is a small transaction, so a crash leaves either the old or the new state. Both databases
run the same SQL through `SqlState`; a `Dialect` holds the few places where they differ. The contract
test (tests/test_state.py) runs against every implementation.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlsplit

from offsite.errors import AlreadyExistsError, ConfigError, NotFoundError, shown


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    name: str
    signing_key: bytes
    enrolled_at: float
    last_seen: float
    revoked_at: float | None = None
    activity: str = ""     # what the client last said it was doing (heartbeat)
    bytes_in: int = 0      # bytes the coordinator received from it
    bytes_out: int = 0     # bytes the coordinator served to it


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    config_json: str
    status: str           # "running" | "finalizing" | "done" | "failed"
    round: int            # the open round (0-based); equals total rounds once training is over
    artifacts_json: str   # digests of the bundle manifest, skeleton, global adapter per round


@dataclass(frozen=True)
class UpdateRecord:
    job_id: str
    round: int
    client_id: str
    num_examples: int
    blob_sha256: str
    upload_bytes: int
    accepted_at: float = 0.0
    train_loss: float | None = None   # the client's own report of its mean training loss this round


@dataclass(frozen=True)
class UploadRecord:
    """An upload in progress; its bytes so far live in the coordinator's upload spool."""
    upload_id: str
    job_id: str
    round: int
    client_id: str
    num_examples: int
    size: int
    sha256: str
    train_loss: float | None = None   # what the client reported in its header, kept until the update is counted


@dataclass(frozen=True)
class ApiKeyRecord:
    """A key that lets a downstream user query the models of some jobs (offsite.cloud.api_keys).
    Only the secret's hash is kept, so a leaked database does not let anyone query."""
    key_id: str
    key_hash: str
    jobs: tuple[str, ...]            # the job ids whose models this key may query
    label: str
    created_at: float
    expires_at: float | None = None  # None: never
    revoked_at: float | None = None
    last_used: float | None = None   # updated at most about once a minute (offsite.cloud.api_keys.TOUCH_INTERVAL_S)


class State(Protocol):
    def add_token(self, token_hash: str, name: str, expires_at: float) -> None: ...
    def consume_token(self, token_hash: str, now: float) -> str | None: ...
    def add_client(self, client_id: str, name: str, signing_key: bytes) -> None: ...
    def client(self, client_id: str) -> ClientRecord: ...
    def revoke_client(self, client_id: str) -> None: ...
    def clients(self) -> list[ClientRecord]: ...
    def touch_client(self, client_id: str, activity: str | None = None) -> None: ...
    def add_traffic(self, client_id: str, bytes_in: int = 0, bytes_out: int = 0) -> None: ...
    def add_job(self, job_id: str, config_json: str, artifacts_json: str) -> None: ...
    def job(self, job_id: str) -> JobRecord: ...
    def jobs(self) -> list[JobRecord]: ...
    def update_job(self, job_id: str, *, status: str | None = None, round: int | None = None,
                   artifacts_json: str | None = None) -> None: ...
    def add_update(self, update: UpdateRecord) -> int: ...
    def updates(self, job_id: str, round: int | None = None) -> list[UpdateRecord]: ...
    def add_rejection(self, job_id: str, round: int, client_id: str, reason: str) -> None: ...
    def rejections(self, job_id: str) -> list[tuple[int, str, str]]: ...
    def open_upload(self, upload: UploadRecord) -> None: ...
    def upload(self, upload_id: str) -> UploadRecord: ...
    def uploads(self, job_id: str, round: int) -> list[UploadRecord]: ...
    def client_uploads(self, client_id: str) -> list[UploadRecord]: ...
    def open_uploads(self) -> list[UploadRecord]: ...
    def upload_bytes(self, client_id: str | None = None) -> int: ...
    def close_upload(self, upload_id: str) -> None: ...
    def add_api_key(self, record: ApiKeyRecord) -> None: ...
    def api_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None: ...
    def api_keys(self) -> list[ApiKeyRecord]: ...
    def revoke_api_key(self, key_id: str) -> None: ...
    def touch_api_key(self, key_id: str, now: float) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    used_at DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS clients (client_id TEXT PRIMARY KEY, name TEXT NOT NULL, signing_key {blob} NOT NULL,
    enrolled_at DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION,
    activity TEXT NOT NULL DEFAULT '', bytes_in BIGINT NOT NULL DEFAULT 0, bytes_out BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, config_json TEXT NOT NULL, status TEXT NOT NULL,
    round INTEGER NOT NULL, artifacts_json TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS updates (job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL, blob_sha256 TEXT NOT NULL, upload_bytes BIGINT NOT NULL,
    accepted_at DOUBLE PRECISION NOT NULL, train_loss DOUBLE PRECISION, PRIMARY KEY (job_id, round, client_id));
CREATE TABLE IF NOT EXISTS rejections (job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL,
    reason TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (upload_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, round INTEGER NOT NULL,
    client_id TEXT NOT NULL, num_examples INTEGER NOT NULL, size BIGINT NOT NULL, sha256 TEXT NOT NULL,
    train_loss DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, jobs TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '', created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION,
    revoked_at DOUBLE PRECISION, last_used DOUBLE PRECISION)
"""
# api_keys.jobs is a JSON list of job ids; expires_at NULL means the key never expires.


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases: the connection, the parameter mark, one type, one error."""
    connect: Callable[[], object]     # an autocommit DB-API connection
    param: str                        # "?" (sqlite3) or "%s" (psycopg)
    blob: str                         # column type for bytes
    integrity_error: type[Exception]
    setup: tuple[str, ...] = ()       # statements run once per connection


class SqlState:
    """State in one SQL database; safe to share between the server's threads (one connection, one lock)."""

    def __init__(self, dialect: Dialect):
        self._dialect = dialect
        self._db = dialect.connect()
        self._lock = threading.Lock()
        for statement in dialect.setup + tuple(_SCHEMA.format(blob=dialect.blob).split(";")):
            self._db.execute(statement)

    def _execute(self, sql: str, args: tuple = ()):
        """Run one statement; the caller holds the lock."""
        return self._db.execute(sql.replace("?", self._dialect.param), args)

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            cur = self._execute(sql, args)
            return cur.fetchall() if cur.description else []

    def add_token(self, token_hash: str, name: str, expires_at: float) -> None:
        self._run("INSERT INTO tokens VALUES (?, ?, ?, NULL)", (token_hash, name, expires_at))

    def consume_token(self, token_hash: str, now: float) -> str | None:
        """Mark the token used and return its client name, or None if unknown, used or expired."""
        rows = self._run("UPDATE tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? RETURNING name",
                         (now, token_hash, now))
        return rows[0][0] if rows else None

    def add_client(self, client_id: str, name: str, signing_key: bytes) -> None:
        now = time.time()
        self._run("INSERT INTO clients (client_id, name, signing_key, enrolled_at, last_seen) VALUES (?, ?, ?, ?, ?)",
                  (client_id, name, signing_key, now, now))

    _CLIENT = "SELECT client_id, name, signing_key, enrolled_at, last_seen, revoked_at, activity, bytes_in, bytes_out FROM clients"

    @staticmethod
    def _client(row: tuple) -> ClientRecord:
        return ClientRecord(row[0], row[1], bytes(row[2]), *row[3:])

    def client(self, client_id: str) -> ClientRecord:
        rows = self._run(self._CLIENT + " WHERE client_id = ?", (client_id,))
        if not rows:
            raise NotFoundError(f"no client {client_id}")
        return self._client(rows[0])

    def clients(self) -> list[ClientRecord]:
        return [self._client(r) for r in self._run(self._CLIENT + " ORDER BY name")]

    def revoke_client(self, client_id: str) -> None:
        self.client(client_id)
        self._run("UPDATE clients SET revoked_at = COALESCE(revoked_at, ?) WHERE client_id = ?", (time.time(), client_id))

    def touch_client(self, client_id: str, activity: str | None = None) -> None:
        self._run("UPDATE clients SET last_seen = ?, activity = COALESCE(?, activity) WHERE client_id = ?",
                  (time.time(), activity, client_id))

    def add_traffic(self, client_id: str, bytes_in: int = 0, bytes_out: int = 0) -> None:
        self._run("UPDATE clients SET bytes_in = bytes_in + ?, bytes_out = bytes_out + ? WHERE client_id = ?",
                  (bytes_in, bytes_out, client_id))

    def add_job(self, job_id: str, config_json: str, artifacts_json: str) -> None:
        try:
            self._run("INSERT INTO jobs VALUES (?, ?, 'running', 0, ?, ?)", (job_id, config_json, artifacts_json, time.time()))
        except self._dialect.integrity_error:
            raise AlreadyExistsError(f"job {job_id} already exists") from None

    _JOB = "SELECT job_id, config_json, status, round, artifacts_json FROM jobs"

    def job(self, job_id: str) -> JobRecord:
        rows = self._run(self._JOB + " WHERE job_id = ?", (job_id,))
        if not rows:
            raise NotFoundError(f"no job {job_id!r}")
        return JobRecord(*rows[0])

    def jobs(self) -> list[JobRecord]:
        return [JobRecord(*r) for r in self._run(self._JOB + " ORDER BY created_at")]

    def update_job(self, job_id: str, *, status: str | None = None, round: int | None = None,
                   artifacts_json: str | None = None) -> None:
        job = self.job(job_id)
        self._run("UPDATE jobs SET status = ?, round = ?, artifacts_json = ? WHERE job_id = ?",
                  (status or job.status, job.round if round is None else round, artifacts_json or job.artifacts_json, job_id))

    def add_update(self, update: UpdateRecord) -> int:
        """Record an accepted update once; return how many the round now has."""
        with self._lock:
            try:
                self._execute("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              (update.job_id, update.round, update.client_id, update.num_examples,
                               update.blob_sha256, update.upload_bytes, update.accepted_at, update.train_loss))
            except self._dialect.integrity_error:
                raise AlreadyExistsError(f"client {update.client_id} already has an accepted update for round {update.round}") from None
            return self._execute("SELECT COUNT(*) FROM updates WHERE job_id = ? AND round = ?",
                                 (update.job_id, update.round)).fetchone()[0]

    def updates(self, job_id: str, round: int | None = None) -> list[UpdateRecord]:
        sql = "SELECT * FROM updates WHERE job_id = ?"
        args: tuple = (job_id,)
        if round is not None:
            sql, args = sql + " AND round = ?", (job_id, round)
        return [UpdateRecord(*r) for r in self._run(sql + " ORDER BY round, client_id", args)]

    def add_rejection(self, job_id: str, round: int, client_id: str, reason: str) -> None:
        self._run("INSERT INTO rejections VALUES (?, ?, ?, ?, ?)", (job_id, round, client_id, reason, time.time()))

    def rejections(self, job_id: str) -> list[tuple[int, str, str]]:
        return [tuple(r) for r in self._run("SELECT round, client_id, reason FROM rejections WHERE job_id = ? ORDER BY at", (job_id,))]

    def open_upload(self, upload: UploadRecord) -> None:
        """Record an upload once; opening the same upload id again keeps the first record."""
        self._run("INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                  (upload.upload_id, upload.job_id, upload.round, upload.client_id, upload.num_examples, upload.size,
                   upload.sha256, upload.train_loss))

    def upload(self, upload_id: str) -> UploadRecord:
        rows = self._run("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,))
        if not rows:
            raise NotFoundError(f"no open upload {upload_id[:16]!r}")
        return UploadRecord(*rows[0])

    def uploads(self, job_id: str, round: int) -> list[UploadRecord]:
        return [UploadRecord(*r) for r in self._run("SELECT * FROM uploads WHERE job_id = ? AND round = ? ORDER BY upload_id", (job_id, round))]

    def client_uploads(self, client_id: str) -> list[UploadRecord]:
        return [UploadRecord(*r) for r in self._run("SELECT * FROM uploads WHERE client_id = ? ORDER BY upload_id", (client_id,))]

    def open_uploads(self) -> list[UploadRecord]:
        return [UploadRecord(*r) for r in self._run("SELECT * FROM uploads ORDER BY upload_id")]

    def upload_bytes(self, client_id: str | None = None) -> int:
        """The announced sizes of open uploads summed: one client's, or everyone's."""
        if client_id is None:
            return int(self._run("SELECT COALESCE(SUM(size), 0) FROM uploads")[0][0])
        return int(self._run("SELECT COALESCE(SUM(size), 0) FROM uploads WHERE client_id = ?", (client_id,))[0][0])

    def close_upload(self, upload_id: str) -> None:
        self._run("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))

    def add_api_key(self, record: ApiKeyRecord) -> None:
        try:
            self._run("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (record.key_id, record.key_hash, json.dumps(list(record.jobs)), record.label, record.created_at,
                       record.expires_at, record.revoked_at, record.last_used))
        except self._dialect.integrity_error:
            raise AlreadyExistsError(f"API key {record.key_id} already exists") from None

    _API_KEY = "SELECT key_id, key_hash, jobs, label, created_at, expires_at, revoked_at, last_used FROM api_keys"

    @staticmethod
    def _api_key(row: tuple) -> ApiKeyRecord:
        return ApiKeyRecord(row[0], row[1], tuple(json.loads(row[2])), *row[3:])

    def api_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        rows = self._run(self._API_KEY + " WHERE key_hash = ?", (key_hash,))
        return self._api_key(rows[0]) if rows else None

    def api_keys(self) -> list[ApiKeyRecord]:
        return [self._api_key(r) for r in self._run(self._API_KEY + " ORDER BY created_at, key_id")]

    def revoke_api_key(self, key_id: str) -> None:
        """Revoking twice keeps the first time."""
        rows = self._run("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ? RETURNING key_id",
                         (time.time(), key_id))
        if not rows:
            raise NotFoundError(f"no API key {shown(key_id)}")

    def touch_api_key(self, key_id: str, now: float) -> None:
        self._run("UPDATE api_keys SET last_used = ? WHERE key_id = ?", (now, key_id))


class SqliteState(SqlState):
    """State in one SQLite file (WAL mode), or in memory for ":memory:"."""

    def __init__(self, path: str | Path):
        super().__init__(Dialect(lambda: sqlite3.connect(str(path), check_same_thread=False, isolation_level=None),
                                 "?", "BLOB", sqlite3.IntegrityError, ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL")))


class PostgresState(SqlState):
    """State in PostgreSQL through psycopg 3; a password belongs in PGPASSWORD or ~/.pgpass, not in the URL."""

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise ConfigError("a postgresql:// state database needs psycopg: pip install 'psycopg[binary]'") from None
        try:
            super().__init__(Dialect(lambda: psycopg.connect(url, autocommit=True), "%s", "BYTEA", psycopg.IntegrityError))
        except psycopg.OperationalError as e:
            raise ConfigError(f"cannot open the state database {redact(url)}: {e}") from None


DB_URL_ENV = "OFFSITE_DB_URL"


def db_url(default_sqlite: Path, configured: str | None = None) -> str:
    """The state database's URL: $OFFSITE_DB_URL, else the one `cloud init --db` recorded, else SQLite in the folder."""
    return os.environ.get(DB_URL_ENV) or configured or f"sqlite:///{default_sqlite}"


def open_state(url: str) -> SqlState:
    """`sqlite:///path` (three slashes, then the path: four for an absolute one) or `postgresql://...`."""
    if url.startswith("sqlite:///"):
        return SqliteState(url[len("sqlite:///"):])
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        return PostgresState(url)
    raise ConfigError(f"state database URL must start with sqlite:/// or postgresql://, got {redact(url)!r}")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
