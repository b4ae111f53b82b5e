"""The coordinator's durable state behind one interface, in SQLite (default) or PostgreSQL.

Every method is a small transaction, so a crash leaves either the old or the new state. Both databases
run the same SQL through `SqlState`; a `Dialect` holds the few places where they differ. The contract
test (tests/test_state.py) runs against every implementation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlsplit

from offsite.errors import AlreadyExistsError, ConfigError, NotFoundError, PreconditionError, shown


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


# A job's status and the statuses it may move to; set_job_status refuses any other move, and makes it as a
# compare-and-set, so two coordinator processes on one database never both make the same move.
JOB_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "created": ("running", "cancelled", "failed"),   # its emulator is being built (start_job makes it running)
    "running": ("finalizing", "cancelled", "failed"),
    "finalizing": ("done", "failed"),
    "done": (),
    "failed": (),        # retry_finalization moves one whose training finished back to finalizing
    "cancelled": (),
}


class _Unchanged(Exception):
    """Rolls a transaction back on purpose: what it would change is not there to change."""


class UpdatesArrivedError(PreconditionError):
    """A round's close lost a race with an update: aggregate the round again, with it."""


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    config_json: str
    status: str           # a key of JOB_TRANSITIONS
    round: int            # the open round (0-based); equals total rounds once training is over
    artifacts_json: str   # the bundle's and skeleton's digests, the plan, the specs (global adapters: the rounds table)


@dataclass(frozen=True)
class RoundRecord:
    """One round of a job as the rounds table holds it: the global adapter it starts from, the clients
    selected to train it and, once closed, the global adapter it produced and why it closed."""
    job_id: str
    round: int
    status: str                       # "open" | "closed"
    adapter_sha256: str               # the global adapter the round starts from (what its clients download)
    opened_at: float
    deadline: float | None = None     # set by its first accepted update when the job has a round_timeout_s
    closed_at: float | None = None
    result_sha256: str | None = None  # the next global adapter (adapter_sha256 again when it closed without one)
    reason: str = ""
    selected: tuple[str, ...] = ()    # client ids, in the order they were selected


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
    heldout_loss: float | None = None  # its report of the received global adapter's loss on its held-out data


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
    heldout_loss: float | None = None


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
    def has_token(self, name: str) -> bool: ...
    def token_names(self) -> set[str]: ...
    def add_client(self, client_id: str, name: str, signing_key: bytes) -> None: ...
    def client(self, client_id: str) -> ClientRecord: ...
    def revoke_client(self, client_id: str) -> None: ...
    def clients(self) -> list[ClientRecord]: ...
    def touch_client(self, client_id: str, activity: str | None = None) -> None: ...
    def flush_touches(self) -> None: ...
    def add_traffic(self, client_id: str, bytes_in: int = 0, bytes_out: int = 0) -> None: ...
    def add_job(self, job_id: str, config_json: str, now: float) -> None: ...
    def start_job(self, job_id: str, artifacts_json: str, adapter_sha256: str, now: float) -> None: ...
    def forget_job(self, job_id: str) -> bool: ...
    def delete_job(self, job_id: str) -> None: ...
    def retry_finalization(self, job_id: str) -> None: ...
    def claim_finalization(self, job_id: str, now: float, take_over: bool = False) -> bool: ...
    def job(self, job_id: str) -> JobRecord: ...
    def jobs(self) -> list[JobRecord]: ...
    def set_job_status(self, job_id: str, status: str) -> None: ...
    def update_artifacts(self, job_id: str, artifacts_json: str) -> None: ...
    def round(self, job_id: str, round: int) -> RoundRecord: ...
    def rounds(self, job_id: str) -> list[RoundRecord]: ...
    def global_adapters(self, job_id: str) -> list[str]: ...
    def select_clients(self, job_id: str, round: int, client_ids: list[str], now: float) -> None: ...
    def set_deadline(self, job_id: str, round: int, deadline: float) -> None: ...
    def close_round(self, job_id: str, round: int, *, updates: int, result_sha256: str, reason: str, artifacts_json: str,
                    last: bool, now: float) -> bool: ...
    def add_update(self, update: UpdateRecord) -> int: ...
    def has_update(self, job_id: str, round: int, client_id: str) -> bool: ...
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
    accepted_at DOUBLE PRECISION NOT NULL, train_loss DOUBLE PRECISION, heldout_loss DOUBLE PRECISION,
    PRIMARY KEY (job_id, round, client_id));
CREATE TABLE IF NOT EXISTS rejections (job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL,
    reason TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (upload_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, round INTEGER NOT NULL,
    client_id TEXT NOT NULL, num_examples INTEGER NOT NULL, size BIGINT NOT NULL, sha256 TEXT NOT NULL,
    train_loss DOUBLE PRECISION, heldout_loss DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, jobs TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '', created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION,
    revoked_at DOUBLE PRECISION, last_used DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS rounds (job_id TEXT NOT NULL, round INTEGER NOT NULL, status TEXT NOT NULL,
    adapter_sha256 TEXT NOT NULL, opened_at DOUBLE PRECISION NOT NULL, deadline DOUBLE PRECISION,
    closed_at DOUBLE PRECISION, result_sha256 TEXT, reason TEXT NOT NULL DEFAULT '', PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS selections (job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL,
    seat INTEGER NOT NULL, selected_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (job_id, round, client_id));
CREATE TABLE IF NOT EXISTS finalizations (job_id TEXT PRIMARY KEY, claimed_at DOUBLE PRECISION NOT NULL)
"""
# api_keys.jobs is a JSON list of job ids; expires_at NULL means the key never expires.


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases: the connection, the parameter mark, one type, one error."""
    connect: Callable[[], object]     # an autocommit DB-API connection
    param: str                        # "?" (sqlite3) or "%s" (psycopg)
    blob: str                         # column type for bytes
    integrity_error: type[Exception]
    begin: str                        # opens a writing transaction (SQLite: BEGIN IMMEDIATE, so no upgrade deadlock)
    share_lock: str                   # appended to a SELECT whose rows must not change until the transaction ends
    greatest: str                     # the larger of two values: MAX (SQLite) or GREATEST (PostgreSQL)
    setup: tuple[str, ...] = ()       # statements run once per connection


TOUCH_FLUSH_S = 1.0  # how far behind the database's last-seen times may be (see SqlState.touch_client)


class SqlState:
    """State in one SQL database, safe to share between the server's threads: each thread has a connection
    of its own, so that reads and short writes run side by side (the database orders what conflicts). An
    in-memory SQLite database is one database per connection: it keeps one, behind a lock."""

    def __init__(self, dialect: Dialect, one_connection: bool = False):
        self._dialect = dialect
        self._local = threading.local()
        self._one = self._connect() if one_connection else None
        self._lock = threading.Lock() if one_connection else contextlib.nullcontext()
        self._touches: dict[str, tuple[float, str | None]] = {}  # client id -> (last seen, activity) not yet written
        self._touch_lock = threading.Lock()
        self._flushing = threading.Lock()
        self._next_flush = 0.0
        for statement in _SCHEMA.format(blob=dialect.blob).split(";"):
            self._db.execute(statement)
        self._migrate()

    def _connect(self):
        db = self._dialect.connect()
        for statement in self._dialect.setup:
            db.execute(statement)
        return db

    @property
    def _db(self):
        """This thread's connection (made on its first use), or the one connection."""
        if self._one is not None:
            return self._one
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def _migrate(self) -> None:
        """Databases made before the clients' held-out reports get the column (NULL: not reported). Jobs made
        before the rounds table kept their global adapters as a list in artifacts_json: one rounds row per
        round from it (the job's open round stays open), and the list dropped."""
        for table in ("updates", "uploads"):
            if "heldout_loss" not in self._columns(table):
                self._run(f"ALTER TABLE {table} ADD COLUMN heldout_loss DOUBLE PRECISION")
        for job in self.jobs():
            art = json.loads(job.artifacts_json)
            if "adapters" not in art:
                continue
            adapters = art.pop("adapters")
            with self._transaction():
                for r, digest in enumerate(adapters):
                    result = adapters[r + 1] if r + 1 < len(adapters) else None
                    if result is None and job.status != "running":  # a finished job's last adapter: its last round's result
                        continue
                    self._execute("INSERT INTO rounds VALUES (?, ?, ?, ?, 0, NULL, ?, ?, ?) ON CONFLICT DO NOTHING",
                                  (job.job_id, r, "open" if result is None else "closed", digest,
                                   None if result is None else 0.0, result, "" if result is None else "before the rounds table"))
                self._execute("UPDATE jobs SET artifacts_json = ? WHERE job_id = ?", (json.dumps(art), job.job_id))

    def _columns(self, table: str) -> list[str]:
        with self._lock:
            return [d[0] for d in self._db.execute(f"SELECT * FROM {table} LIMIT 0").description]

    @contextlib.contextmanager
    def _transaction(self):
        """Statements that commit together or not at all; the caller runs them with _execute."""
        with self._lock:
            self._execute(self._dialect.begin)
            try:
                yield
            except BaseException:
                self._execute("ROLLBACK")
                raise
            self._execute("COMMIT")

    def _execute(self, sql: str, args: tuple = ()):
        """Run one statement on this thread's connection; the caller holds the lock (one connection only)."""
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

    def has_token(self, name: str) -> bool:
        """Whether an enrollment token was ever issued for the client name."""
        return bool(self._run("SELECT 1 FROM tokens WHERE name = ?", (name,)))

    def token_names(self) -> set[str]:
        """Every client name an enrollment token was issued for (used or not)."""
        return {name for (name,) in self._run("SELECT DISTINCT name FROM tokens")}

    def add_client(self, client_id: str, name: str, signing_key: bytes) -> None:
        now = time.time()
        self._run("INSERT INTO clients (client_id, name, signing_key, enrolled_at, last_seen) VALUES (?, ?, ?, ?, ?)",
                  (client_id, name, signing_key, now, now))

    _CLIENT = "SELECT client_id, name, signing_key, enrolled_at, last_seen, revoked_at, activity, bytes_in, bytes_out FROM clients"

    def _client(self, row: tuple) -> ClientRecord:
        record = ClientRecord(row[0], row[1], bytes(row[2]), *row[3:])
        pending = self._touches.get(record.client_id)  # what this process saw and has not written yet
        if pending is None:
            return record
        return dataclasses.replace(record, last_seen=max(record.last_seen, pending[0]), activity=pending[1] or record.activity)

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
        """Record that the client was seen (doing `activity`). Written behind: in memory at once (this
        process's reads see it), to the database in one transaction at most every TOUCH_FLUSH_S, since a
        synchronous commit on every call of every client was the coordinator's busiest write. A crash
        loses at most that much of last-seen times, which are for monitoring and seat liveness only."""
        now = time.time()
        with self._touch_lock:
            earlier = self._touches.get(client_id)
            self._touches[client_id] = (now, activity if activity is not None else earlier[1] if earlier else None)
            due = now >= self._next_flush
        if due:
            self.flush_touches()

    def flush_touches(self) -> None:
        """Write the pending last-seen times and activities (the round worker calls this each second, and
        the server at its end)."""
        if not self._flushing.acquire(blocking=False):
            return  # another thread is writing them now
        try:
            with self._touch_lock:
                pending, self._next_flush = dict(self._touches), time.time() + TOUCH_FLUSH_S
            if not pending:
                return
            with self._transaction():  # rows in one order, so two coordinators' flushes cannot deadlock
                for client_id in sorted(pending):
                    seen, activity = pending[client_id]
                    self._execute(f"UPDATE clients SET last_seen = {self._dialect.greatest}(last_seen, ?), "
                                  "activity = COALESCE(?, activity) WHERE client_id = ?", (seen, activity, client_id))
            with self._touch_lock:  # drop what was written, unless a newer touch came meanwhile
                for client_id, value in pending.items():
                    if self._touches.get(client_id) == value:
                        del self._touches[client_id]
        finally:
            self._flushing.release()

    def add_traffic(self, client_id: str, bytes_in: int = 0, bytes_out: int = 0) -> None:
        self._run("UPDATE clients SET bytes_in = bytes_in + ?, bytes_out = bytes_out + ? WHERE client_id = ?",
                  (bytes_in, bytes_out, client_id))

    def add_job(self, job_id: str, config_json: str, now: float) -> None:
        """The job, created: its id is taken (by one coordinator process only) while its emulator is built."""
        try:
            self._run("INSERT INTO jobs VALUES (?, ?, 'created', 0, '{}', ?)", (job_id, config_json, now))
        except self._dialect.integrity_error:
            raise AlreadyExistsError(f"job {job_id} already exists") from None

    def start_job(self, job_id: str, artifacts_json: str, adapter_sha256: str, now: float) -> None:
        """The created job, running with what its creation built, round 0 open from the global adapter
        `adapter_sha256`; in one transaction, and only from created (a job cancelled meanwhile stays so)."""
        try:
            with self._transaction():
                if not self._execute("UPDATE jobs SET status = 'running', artifacts_json = ? WHERE job_id = ? AND status = 'created' "
                                     "RETURNING job_id", (artifacts_json, job_id)).fetchall():
                    raise _Unchanged
                self._execute("INSERT INTO rounds (job_id, round, status, adapter_sha256, opened_at) VALUES (?, 0, 'open', ?, ?)",
                              (job_id, adapter_sha256, now))
        except _Unchanged:
            raise PreconditionError(f"job {job_id} cannot start: it is {self.job(job_id).status}, not created") from None

    def forget_job(self, job_id: str) -> bool:
        """Remove a job whose creation failed (still created: nothing ran), so that its id can be used again."""
        return bool(self._run("DELETE FROM jobs WHERE job_id = ? AND status = 'created' RETURNING job_id", (job_id,)))

    def delete_job(self, job_id: str) -> None:
        """Remove a job that nothing writes to any more (failed, cancelled or done) with every row that names
        it, in one transaction, so that its id can be used again. An API key loses its grant to the job, and
        one left with none is revoked: a key must not open the model of a later job that takes the id. The
        job's files and blobs are the caller's to remove (offsite.cloud.job_admin), after this commits."""
        try:
            with self._transaction():
                if not self._execute("DELETE FROM jobs WHERE job_id = ? AND status IN ('failed', 'cancelled', 'done') "
                                     "RETURNING job_id", (job_id,)).fetchall():
                    raise _Unchanged
                for table in ("rounds", "selections", "updates", "rejections", "uploads", "finalizations"):
                    self._execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
                for key_id, jobs in self._execute("SELECT key_id, jobs FROM api_keys").fetchall():
                    granted = json.loads(jobs)
                    if job_id in granted:
                        self._execute("UPDATE api_keys SET jobs = ? WHERE key_id = ?",
                                      (json.dumps([j for j in granted if j != job_id]), key_id))
                        if granted == [job_id]:
                            self._execute("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?",
                                          (time.time(), key_id))
        except _Unchanged:
            raise PreconditionError(f"job {job_id} cannot be deleted: it is {self.job(job_id).status}") from None

    def retry_finalization(self, job_id: str) -> None:
        """Move a failed job whose training finished (it has closed rounds and no open one, so it failed in
        finalization) back to finalizing and drop the claim on its finalization, in one compare-and-set
        transaction: the next coordinator that claims it (claim_finalization) finalizes it again."""
        try:
            with self._transaction():
                if not self._execute("UPDATE jobs SET status = 'finalizing' WHERE job_id = ? AND status = 'failed' "
                                     "AND EXISTS (SELECT 1 FROM rounds WHERE job_id = ? AND status = 'closed') "
                                     "AND NOT EXISTS (SELECT 1 FROM rounds WHERE job_id = ? AND status = 'open') "
                                     "RETURNING job_id", (job_id, job_id, job_id)).fetchall():
                    raise _Unchanged
                self._execute("DELETE FROM finalizations WHERE job_id = ?", (job_id,))
        except _Unchanged:
            status = self.job(job_id).status
            if status != "failed":
                raise PreconditionError(f"job {job_id} is {status}: only a failed job's finalization can run again") from None
            open_ = [r.round for r in self.rounds(job_id) if r.status == "open"]
            raise PreconditionError(f"job {job_id} failed during training" +
                                    (f" (its round {open_[0] + 1} never closed)" if open_ else " (before its first round)") +
                                    ": there is no trained adapter to finalize") from None

    def claim_finalization(self, job_id: str, now: float, take_over: bool = False) -> bool:
        """Whether the caller is the one to finalize the job: the first claim wins, so coordinators sharing the
        database finalize a job once. `take_over` wins whatever was claimed before: a coordinator starting
        up redoes the finalizations that a crash cut short."""
        conflict = "DO UPDATE SET claimed_at = excluded.claimed_at" if take_over else "DO NOTHING"
        return bool(self._run(f"INSERT INTO finalizations VALUES (?, ?) ON CONFLICT (job_id) {conflict} RETURNING job_id",
                              (job_id, now)))

    _JOB = "SELECT job_id, config_json, status, round, artifacts_json FROM jobs"

    def job(self, job_id: str) -> JobRecord:
        rows = self._run(self._JOB + " WHERE job_id = ?", (job_id,))
        if not rows:
            raise NotFoundError(f"no job {job_id!r}")
        return JobRecord(*rows[0])

    def jobs(self) -> list[JobRecord]:
        return [JobRecord(*r) for r in self._run(self._JOB + " ORDER BY created_at")]

    def set_job_status(self, job_id: str, status: str) -> None:
        """Move the job to `status` if JOB_TRANSITIONS allows it from the status it has (compare-and-set)."""
        if status not in JOB_TRANSITIONS:
            raise ConfigError(f"no job status {status!r}; one of {', '.join(JOB_TRANSITIONS)}")
        current = self.job(job_id).status
        if current == "created" and status == "running":
            raise PreconditionError(f"job {job_id} starts with start_job, which opens its round 0")
        if status not in JOB_TRANSITIONS[current] or not self._run(
                "UPDATE jobs SET status = ? WHERE job_id = ? AND status = ? RETURNING job_id", (status, job_id, current)):
            raise PreconditionError(f"job {job_id} cannot become {status}: it is {self.job(job_id).status}")

    def update_artifacts(self, job_id: str, artifacts_json: str) -> None:
        self.job(job_id)
        self._run("UPDATE jobs SET artifacts_json = ? WHERE job_id = ?", (artifacts_json, job_id))

    _ROUND = ("SELECT job_id, round, status, adapter_sha256, opened_at, deadline, closed_at, result_sha256, reason "
              "FROM rounds WHERE job_id = ?")

    def _selected(self, job_id: str, round: int | None) -> dict[int, tuple[str, ...]]:
        sql, args = "SELECT round, client_id FROM selections WHERE job_id = ?", (job_id,)
        if round is not None:
            sql, args = sql + " AND round = ?", (job_id, round)
        out: dict[int, list[str]] = {}
        for r, client_id in self._run(sql + " ORDER BY round, seat, client_id", args):
            out.setdefault(r, []).append(client_id)
        return {r: tuple(ids) for r, ids in out.items()}

    def round(self, job_id: str, round: int) -> RoundRecord:
        rows = self._run(self._ROUND + " AND round = ?", (job_id, round))
        if not rows:
            raise NotFoundError(f"job {job_id!r} has no round {round + 1}")
        return RoundRecord(*rows[0], selected=self._selected(job_id, round).get(round, ()))

    def rounds(self, job_id: str) -> list[RoundRecord]:
        selected = self._selected(job_id, None)
        return [RoundRecord(*r, selected=selected.get(r[1], ())) for r in self._run(self._ROUND + " ORDER BY round", (job_id,))]

    def global_adapters(self, job_id: str) -> list[str]:
        """The job's global adapters in order: the one round 0 starts from, then each closed round's result."""
        rows = self._run("SELECT adapter_sha256, result_sha256 FROM rounds WHERE job_id = ? ORDER BY round", (job_id,))
        return [rows[0][0], *(result for _, result in rows if result is not None)] if rows else []

    def select_clients(self, job_id: str, round: int, client_ids: list[str], now: float) -> None:
        """Add clients to the round's selection after those it has; one already selected keeps its seat."""
        with self._transaction():
            seats = self._execute("SELECT COUNT(*) FROM selections WHERE job_id = ? AND round = ?", (job_id, round)).fetchone()[0]
            for i, client_id in enumerate(client_ids):
                self._execute("INSERT INTO selections VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                              (job_id, round, client_id, seats + i, now))

    def set_deadline(self, job_id: str, round: int, deadline: float) -> None:
        """The round's deadline, set once: a later call keeps the first."""
        self._run("UPDATE rounds SET deadline = COALESCE(deadline, ?) WHERE job_id = ? AND round = ?", (deadline, job_id, round))

    def close_round(self, job_id: str, round: int, *, updates: int, result_sha256: str, reason: str, artifacts_json: str,
                    last: bool, now: float) -> bool:
        """Close the open round `round`, whose result aggregates `updates` updates, and move the job on in
        one transaction: to the next round, opened from `result_sha256`, or when `last`, to finalizing.
        A compare-and-set: False, with nothing changed, when the round is not open (another coordinator
        closed it first) or the job is no longer running (it was cancelled). UpdatesArrivedError, with
        nothing changed, when the round has more updates than the result aggregates: one was accepted
        while the round was being aggregated."""
        try:
            with self._transaction():
                self._close_round(job_id, round, updates, result_sha256, reason, artifacts_json, last, now)
        except _Unchanged:
            return False
        return True

    def _close_round(self, job_id: str, round: int, updates: int, result_sha256: str, reason: str, artifacts_json: str,
                     last: bool, now: float) -> None:
        """close_round's statements, in its transaction; _Unchanged rolls them back."""
        if not self._execute("UPDATE rounds SET status = 'closed', closed_at = ?, result_sha256 = ?, reason = ? "
                             "WHERE job_id = ? AND round = ? AND status = 'open' RETURNING round",
                             (now, result_sha256, reason, job_id, round)).fetchall():
            raise _Unchanged  # another coordinator closed it first
        counted = self._execute("SELECT COUNT(*) FROM updates WHERE job_id = ? AND round = ?", (job_id, round)).fetchone()[0]
        if counted != updates:
            raise UpdatesArrivedError(f"round {round + 1} of job {job_id} has {counted} updates; its result aggregates {updates}")
        if not self._execute("UPDATE jobs SET round = ?, artifacts_json = ?, status = ? "
                             "WHERE job_id = ? AND round = ? AND status = 'running' RETURNING job_id",
                             (round + 1, artifacts_json, "finalizing" if last else "running", job_id, round)).fetchall():
            raise _Unchanged  # the job was cancelled
        if not last:
            self._execute("INSERT INTO rounds (job_id, round, status, adapter_sha256, opened_at) VALUES (?, ?, 'open', ?, ?)",
                          (job_id, round + 1, result_sha256, now))

    def add_update(self, update: UpdateRecord) -> int:
        """Record an accepted update once, while its round is open; return how many the round now has.
        The round's row is read under a share lock, so a close that has read the round's updates cannot
        commit without this one (see close_round)."""
        try:
            with self._transaction():
                row = self._execute("SELECT status FROM rounds WHERE job_id = ? AND round = ?" + self._dialect.share_lock,
                                    (update.job_id, update.round)).fetchone()
                if row is None or row[0] != "open":
                    raise PreconditionError(f"round {update.round + 1} of job {update.job_id} is not open: it closed before "
                                            "this update was in")
                self._execute("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (update.job_id, update.round, update.client_id, update.num_examples,
                               update.blob_sha256, update.upload_bytes, update.accepted_at, update.train_loss,
                               update.heldout_loss))
                return self._execute("SELECT COUNT(*) FROM updates WHERE job_id = ? AND round = ?",
                                     (update.job_id, update.round)).fetchone()[0]
        except self._dialect.integrity_error:
            raise AlreadyExistsError(f"client {update.client_id} already has an accepted update for round {update.round + 1}") from None

    def has_update(self, job_id: str, round: int, client_id: str) -> bool:
        return bool(self._run("SELECT 1 FROM updates WHERE job_id = ? AND round = ? AND client_id = ?", (job_id, round, client_id)))

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
        self._run("INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                  (upload.upload_id, upload.job_id, upload.round, upload.client_id, upload.num_examples, upload.size,
                   upload.sha256, upload.train_loss, upload.heldout_loss))

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
        super().__init__(Dialect(lambda: sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=60.0),
                                 "?", "BLOB", sqlite3.IntegrityError, "BEGIN IMMEDIATE", "", "MAX",
                                 ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL")),
                         one_connection=str(path) == ":memory:")


class PostgresState(SqlState):
    """State in PostgreSQL through psycopg 3; a password belongs in PGPASSWORD or ~/.pgpass, not in the URL."""

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise ConfigError("a postgresql:// state database needs psycopg: pip install 'psycopg[binary]'") from None
        try:
            super().__init__(Dialect(lambda: psycopg.connect(url, autocommit=True), "%s", "BYTEA", psycopg.IntegrityError, "BEGIN",
                                     " FOR SHARE", "GREATEST"))
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
