"""Contract test: every State implementation behaves the same."""
import threading
import time

import pytest

from offsite.cloud.state import JOB_TRANSITIONS, SqliteState, UpdateRecord, UpdatesArrivedError, open_state, redact
from offsite.errors import AlreadyExistsError, ConfigError, NotFoundError, PreconditionError


IMPLEMENTATIONS = {
    "sqlite-file": lambda request, tmp: SqliteState(tmp / "state.sqlite"),
    "sqlite-memory": lambda request, tmp: SqliteState(":memory:"),
    "sqlite-url": lambda request, tmp: open_state(f"sqlite:///{tmp / 'state.sqlite'}"),
    "postgresql": lambda request, tmp: open_state(request.getfixturevalue("postgres_server").new_database()),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def state(request, tmp_path):
    return IMPLEMENTATIONS[request.param](request, tmp_path)


def _start(state, job_id: str, artifacts_json: str) -> None:
    """A job made as create_job makes it: created, then running with round 0 open from adapter a0."""
    state.add_job(job_id, "{}", 1.0)
    state.start_job(job_id, artifacts_json, "a0", 1.0)


def test_a_job_is_created_then_started_once(state):
    state.add_job("j", '{"rounds": 2}', 1.0)
    job = state.job("j")
    assert (job.status, job.round, job.artifacts_json, state.rounds("j")) == ("created", 0, "{}", [])
    state.start_job("j", '{"plan": 1}', "a0", 2.0)
    job = state.job("j")
    assert (job.status, job.artifacts_json, [r.adapter_sha256 for r in state.rounds("j")]) == ("running", '{"plan": 1}', ["a0"])
    with pytest.raises(PreconditionError, match="it is running, not created"):
        state.start_job("j", "{}", "other", 3.0)  # nothing changed: one round 0, the first artifacts
    assert state.job("j").artifacts_json == '{"plan": 1}' and len(state.rounds("j")) == 1
    assert not state.forget_job("j")  # only a creation that never started can be forgotten
    state.add_job("k", "{}", 1.0)
    state.set_job_status("k", "cancelled")  # cancelled while its emulator was built: it does not start after all
    with pytest.raises(PreconditionError, match="it is cancelled"):
        state.start_job("k", "{}", "a0", 2.0)
    state.add_job("f", "{}", 1.0)
    assert state.forget_job("f") and [j.job_id for j in state.jobs()] == ["j", "k"]
    state.add_job("f", "{}", 1.0)  # its id is free again


def test_tokens_are_single_use_and_expire(state):
    now = time.time()
    state.add_token("h1", "client-1", now + 60)
    state.add_token("h2", "client-2", now - 1)
    assert state.consume_token("h1", now) == "client-1"
    assert state.consume_token("h1", now) is None
    assert state.consume_token("h2", now) is None
    assert state.consume_token("nope", now) is None
    assert state.token_names() == {"client-1", "client-2"}   # issued, used or not


def test_clients_and_revocation(state):
    state.add_client("c1", "client-1", b"k" * 32)
    assert state.client("c1").signing_key == b"k" * 32 and state.client("c1").revoked_at is None
    state.revoke_client("c1")
    first = state.client("c1").revoked_at
    state.revoke_client("c1")
    assert first is not None and state.client("c1").revoked_at == first  # revoking twice keeps the first time
    with pytest.raises(NotFoundError):
        state.client("c2")
    with pytest.raises(NotFoundError):
        state.revoke_client("c2")


def test_jobs_and_updates_counted_once(state):
    state.add_job("j", "{}", 1.0)
    with pytest.raises(AlreadyExistsError):
        state.add_job("j", "{}", 1.0)
    state.start_job("j", "{}", "a0", 1.0)
    assert state.add_update(UpdateRecord("j", 0, "c1", 10, "d1", 100)) == 1
    assert state.add_update(UpdateRecord("j", 0, "c2", 20, "d2", 100)) == 2
    with pytest.raises(AlreadyExistsError):
        state.add_update(UpdateRecord("j", 0, "c1", 10, "d3", 100))
    assert [u.client_id for u in state.updates("j", 0)] == ["c1", "c2"]
    assert state.has_update("j", 0, "c1") and not state.has_update("j", 0, "c3") and not state.has_update("j", 1, "c1")
    with pytest.raises(NotFoundError):
        state.job("missing")


def test_rounds_close_once_and_move_the_job(state):
    _start(state, "j", '{"plan": 1}')
    first = state.round("j", 0)
    assert (first.status, first.adapter_sha256, first.opened_at, first.selected, first.deadline) == ("open", "a0", 1.0, (), None)
    state.add_update(UpdateRecord("j", 0, "c1", 10, "d1", 100))
    assert state.close_round("j", 0, updates=1, result_sha256="a1", reason="all in", artifacts_json='{"plan": 2}',
                             last=False, now=5.0)
    assert not state.close_round("j", 0, updates=1, result_sha256="other", reason="again", artifacts_json="{}",
                                 last=False, now=6.0)  # compare-and-set: the second close changes nothing
    job, closed, opened = state.job("j"), state.round("j", 0), state.round("j", 1)
    assert (job.round, job.status, job.artifacts_json) == (1, "running", '{"plan": 2}')
    assert (closed.status, closed.result_sha256, closed.reason, closed.closed_at) == ("closed", "a1", "all in", 5.0)
    assert (opened.status, opened.adapter_sha256, opened.opened_at) == ("open", "a1", 5.0)
    with pytest.raises(PreconditionError, match="not open"):  # a closed round takes no more updates
        state.add_update(UpdateRecord("j", 0, "c2", 10, "d2", 100))
    assert state.close_round("j", 1, updates=0, result_sha256="a2", reason="no update", artifacts_json="{}", last=True, now=7.0)
    assert (state.job("j").round, state.job("j").status) == (2, "finalizing")
    assert [r.round for r in state.rounds("j")] == [0, 1] and state.global_adapters("j") == ["a0", "a1", "a2"]
    with pytest.raises(NotFoundError):
        state.round("j", 2)


def test_a_close_that_missed_an_update_changes_nothing(state):
    _start(state, "j", "{}")
    state.add_update(UpdateRecord("j", 0, "c1", 10, "d1", 100))
    state.add_update(UpdateRecord("j", 0, "c2", 10, "d2", 100))  # accepted while the close aggregated c1's alone
    with pytest.raises(UpdatesArrivedError):
        state.close_round("j", 0, updates=1, result_sha256="a1", reason="", artifacts_json="{}", last=False, now=2.0)
    assert state.round("j", 0).status == "open" and state.job("j").round == 0 and state.global_adapters("j") == ["a0"]


def test_job_status_moves_only_along_its_transitions(state):
    _start(state, "j", "{}")
    with pytest.raises(PreconditionError, match="cannot become done: it is running"):
        state.set_job_status("j", "done")
    with pytest.raises(ConfigError):
        state.set_job_status("j", "paused")
    state.set_job_status("j", "cancelled")
    for status in JOB_TRANSITIONS:
        with pytest.raises(PreconditionError):  # cancelled is final
            state.set_job_status("j", status)
    assert not state.close_round("j", 0, updates=0, result_sha256="a1", reason="", artifacts_json="{}", last=False,
                                 now=2.0)  # nor can a cancelled job's round close
    assert state.round("j", 0).status == "open"


def test_selections_keep_their_order_and_seats(state):
    _start(state, "j", "{}")
    state.select_clients("j", 0, ["c3", "c1"], 2.0)
    state.select_clients("j", 0, ["c1", "c2"], 3.0)  # c1 keeps its seat
    assert state.round("j", 0).selected == ("c3", "c1", "c2") and state.rounds("j")[0].selected == ("c3", "c1", "c2")
    state.set_deadline("j", 0, 10.0)
    state.set_deadline("j", 0, 20.0)  # the first deadline stays
    assert state.round("j", 0).deadline == 10.0


def test_rejections_recorded(state):
    state.add_rejection("j", 0, "c1", "bad signature")
    assert state.rejections("j") == [(0, "c1", "bad signature")]


def test_sqlite_state_survives_reopen(tmp_path):
    first = SqliteState(tmp_path / "s.sqlite")
    _start(first, "j", "{}")
    first.add_update(UpdateRecord("j", 0, "c1", 10, "d1", 100))
    again = SqliteState(tmp_path / "s.sqlite")
    assert len(again.updates("j")) == 1 and again.job("j").status == "running"


TWO_CONNECTIONS = {  # two handles on one database, as two coordinator processes have
    "sqlite-file": lambda request, tmp: (SqliteState(tmp / "s.sqlite"), SqliteState(tmp / "s.sqlite")),
    "postgresql": lambda request, tmp: (lambda url: (open_state(url), open_state(url)))(
        request.getfixturevalue("postgres_server").new_database()),
}


@pytest.mark.parametrize("backend", sorted(TWO_CONNECTIONS))
def test_two_connections_racing_to_close_a_round_close_it_once(backend, request, tmp_path):
    a, b = TWO_CONNECTIONS[backend](request, tmp_path)
    _start(a, "j", "{}")
    for r in range(20):  # each round, both close it at once from their own threads
        start, results = threading.Barrier(2), {}

        def close(name, state):
            start.wait()
            results[name] = state.close_round("j", r, updates=0, result_sha256=f"{name}{r + 1}", reason=name,
                                              artifacts_json="{}", last=False, now=2.0 + r)
        threads = [threading.Thread(target=close, args=(n, s)) for n, s in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == [False, True]
        winner = next(n for n, won in results.items() if won)
        assert b.round("j", r).result_sha256 == f"{winner}{r + 1}" == a.round("j", r + 1).adapter_sha256
    assert a.job("j").round == 20 and len(b.rounds("j")) == 21 and len(a.global_adapters("j")) == 21


def test_a_state_made_before_the_rounds_table_is_migrated(tmp_path):
    import json
    import sqlite3
    path = tmp_path / "old.sqlite"
    SqliteState(path)  # the tables, then two jobs as the old code wrote them
    db = sqlite3.connect(path)
    db.execute("INSERT INTO jobs VALUES ('live', '{}', 'running', 1, ?, 1.0)", (json.dumps({"plan": 1, "adapters": ["a0", "a1"]}),))
    db.execute("INSERT INTO jobs VALUES ('over', '{}', 'done', 2, ?, 2.0)", (json.dumps({"adapters": ["b0", "b1", "b2"]}),))
    db.commit()
    db.close()
    state = SqliteState(path)
    assert [(r.round, r.status, r.adapter_sha256, r.result_sha256) for r in state.rounds("live")] == [
        (0, "closed", "a0", "a1"), (1, "open", "a1", None)]
    assert [(r.round, r.status) for r in state.rounds("over")] == [(0, "closed"), (1, "closed")]
    assert state.global_adapters("over") == ["b0", "b1", "b2"] and json.loads(state.job("live").artifacts_json) == {"plan": 1}
    assert state.global_adapters("live") == SqliteState(path).global_adapters("live") == ["a0", "a1"]  # once


def test_a_state_made_before_heldout_reports_gets_the_column(tmp_path):
    import sqlite3
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)  # the updates and uploads tables as the code before report_heldout made them
    db.execute("CREATE TABLE updates (job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL, num_examples "
               "INTEGER NOT NULL, blob_sha256 TEXT NOT NULL, upload_bytes BIGINT NOT NULL, accepted_at DOUBLE PRECISION "
               "NOT NULL, train_loss DOUBLE PRECISION, PRIMARY KEY (job_id, round, client_id))")
    db.execute("CREATE TABLE uploads (upload_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id "
               "TEXT NOT NULL, num_examples INTEGER NOT NULL, size BIGINT NOT NULL, sha256 TEXT NOT NULL, train_loss DOUBLE PRECISION)")
    db.execute("INSERT INTO updates VALUES ('j', 0, 'c1', 10, 'd1', 5, 1.0, 2.5)")
    db.commit()
    db.close()
    state = SqliteState(path)
    assert [(u.client_id, u.train_loss, u.heldout_loss) for u in state.updates("j")] == [("c1", 2.5, None)]
    state.add_job("j", "{}", 0.0)
    state.start_job("j", "{}", "a0", 0.0)
    state.add_update(UpdateRecord("j", 0, "c2", 10, "d2", 5, 2.0, 1.5, 3.5))
    assert [u.heldout_loss for u in SqliteState(path).updates("j")] == [None, 3.5]


def test_upload_sessions_open_once_and_close(state):
    from offsite.cloud.state import UploadRecord
    up = UploadRecord("a" * 32, "j", 0, "c1", 10, 1000, "d" * 64, train_loss=2.5)
    state.open_upload(up)
    state.open_upload(UploadRecord("a" * 32, "j", 0, "c1", 99, 1, "e" * 64))  # opening again keeps the first record
    assert state.upload("a" * 32) == up and state.uploads("j", 0) == [up] and state.uploads("j", 1) == []
    state.close_upload("a" * 32)
    with pytest.raises(NotFoundError):
        state.upload("a" * 32)


def test_client_activity_and_traffic_accumulate(state):
    state.add_client("c1", "client-1", b"k" * 32)
    state.touch_client("c1", "training round 1 (50%)")
    state.touch_client("c1")  # a call without news keeps the last activity
    state.add_traffic("c1", bytes_in=100)
    state.add_traffic("c1", bytes_in=5, bytes_out=7)
    c = state.client("c1")
    assert (c.activity, c.bytes_in, c.bytes_out) == ("training round 1 (50%)", 105, 7)


@pytest.mark.parametrize("backend", sorted(TWO_CONNECTIONS))
def test_last_seen_is_written_behind_and_flushed(backend, request, tmp_path):
    """A touch shows at once in the process that made it and reaches the database at the next flush;
    a flush never moves a last-seen time back."""
    a, b = TWO_CONNECTIONS[backend](request, tmp_path)
    a.add_client("c1", "client-1", b"k" * 32)
    enrolled = b.client("c1").last_seen
    a.flush_touches()
    time.sleep(0.01)
    a.touch_client("c1", "training round 1 (50%)")  # the first touch after a flush does not write at once
    a.touch_client("c1")
    mine, theirs = a.client("c1"), b.client("c1")
    assert mine.activity == "training round 1 (50%)" and mine.last_seen > enrolled
    assert (theirs.activity, theirs.last_seen) == ("", enrolled)
    a.flush_touches()
    theirs = b.client("c1")
    assert theirs.activity == "training round 1 (50%)" and theirs.last_seen == a.clients()[0].last_seen > enrolled
    b.touch_client("c1", "newer")
    b.flush_touches()
    assert b.client("c1").last_seen >= theirs.last_seen and a.client("c1").activity == "newer"


def test_train_loss_and_bytes_round_trip(state):
    _start(state, "j", "{}")
    state.add_update(UpdateRecord("j", 0, "c1", 10, "d1", 5 * 2**30, 1.5, train_loss=2.25))
    state.add_update(UpdateRecord("j", 0, "c2", 10, "d2", 1))
    assert [(u.upload_bytes, u.accepted_at, u.train_loss) for u in state.updates("j")] == [(5 * 2**30, 1.5, 2.25), (1, 0.0, None)]
    state.add_client("c1", "client-1", bytes(range(256)))
    assert state.client("c1").signing_key == bytes(range(256))


def test_api_keys_round_trip_in_creation_order(state):
    from offsite.cloud.state import ApiKeyRecord
    second = ApiKeyRecord("k2", "h2", ("j1",), "", 20.0)
    first = ApiKeyRecord("k1", "h1", ("j1", "j2"), "alice's notebook", 10.0, expires_at=99.5)
    state.add_api_key(second)
    state.add_api_key(first)
    assert state.api_keys() == [first, second]
    assert state.api_key_by_hash("h1") == first and state.api_key_by_hash("k1") is None
    with pytest.raises(AlreadyExistsError):  # the same id again
        state.add_api_key(ApiKeyRecord("k1", "h3", ("j1",), "", 30.0))
    with pytest.raises(AlreadyExistsError):  # the same secret's hash again
        state.add_api_key(ApiKeyRecord("k3", "h1", ("j1",), "", 30.0))
    assert [k.key_id for k in state.api_keys()] == ["k1", "k2"]


def test_api_keys_revoked_once_and_touched(state):
    from offsite.cloud.state import ApiKeyRecord
    state.add_api_key(ApiKeyRecord("k1", "h1", ("j1",), "", 10.0))
    state.touch_api_key("k1", 1234.5)
    state.touch_api_key("nope", 1.0)  # an unknown key is nothing to touch
    assert state.api_key_by_hash("h1").last_used == 1234.5
    state.revoke_api_key("k1")
    first = state.api_key_by_hash("h1").revoked_at
    state.revoke_api_key("k1")
    assert first is not None and state.api_key_by_hash("h1").revoked_at == first  # revoking twice keeps the first time
    with pytest.raises(NotFoundError):
        state.revoke_api_key("k2")


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "sqlite:/// or postgresql://"),
    ("sqlite://relative.db", "sqlite:/// or postgresql://"),
    ("postgresql://u:hunter2@127.0.0.1:1/db", "cannot open the state database postgresql://u:***@127.0.0.1:1/db"),
])
def test_bad_database_urls_name_the_problem_without_the_password(url, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")) as e:
        open_state(url)
    assert "hunter2" not in str(e.value)


def test_redact_hides_only_the_password():
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_a_state_folder_can_keep_its_database_in_postgresql(postgres_server, tmp_path, monkeypatch):
    from offsite.cloud.identity import StateLayout, hash_secret, init_state
    url = postgres_server.new_database()
    tokens = init_state(tmp_path / "s", ["client-1"], ["localhost"], 3600, url)
    layout = StateLayout(tmp_path / "s")
    assert layout.state_url() == url and not layout.db.exists()
    token = tokens["client-1"].read_text().strip()
    assert open_state(layout.state_url()).consume_token(hash_secret(token), time.time()) == "client-1"
    monkeypatch.setenv("OFFSITE_DB_URL", f"sqlite:///{tmp_path / 'other.sqlite'}")  # the environment wins
    assert open_state(layout.state_url()).consume_token(hash_secret(token), time.time()) is None


def test_init_refuses_an_unreachable_database_before_writing_anything(tmp_path):
    from offsite.cloud.identity import init_state
    with pytest.raises(ConfigError, match="cannot open the state database"):
        init_state(tmp_path / "s", ["client-1"], ["localhost"], 3600, "postgresql://u@127.0.0.1:1/db")
    assert not (tmp_path / "s").exists()


def test_a_job_nothing_writes_to_is_deleted_with_every_row_naming_it(state):
    """Only a failed, cancelled or done job is deleted, in one transaction with its rounds, selections, updates,
    rejections, uploads and finalization claim; another job keeps all of its own; an API key loses its grant
    (revoked when it had no other), so a later job with the id is not opened by it. The id is free again."""
    from offsite.cloud.state import ApiKeyRecord, UploadRecord
    for job_id in ("j", "k"):
        _start(state, job_id, "{}")
        state.select_clients(job_id, 0, ["c1"], 2.0)
        state.add_update(UpdateRecord(job_id, 0, "c1", 10, f"{job_id}-d1", 100))
        state.add_rejection(job_id, 0, "c2", "bad signature")
        state.open_upload(UploadRecord(job_id * 32, job_id, 0, "c3", 10, 1000, "d" * 64))
        state.claim_finalization(job_id, 3.0)
    state.add_api_key(ApiKeyRecord("only-j", "h1", ("j",), "", 1.0))
    state.add_api_key(ApiKeyRecord("both", "h2", ("j", "k"), "", 1.0))
    with pytest.raises(PreconditionError, match="job j cannot be deleted: it is running"):
        state.delete_job("j")
    state.set_job_status("j", "cancelled")
    state.delete_job("j")
    with pytest.raises(NotFoundError):
        state.delete_job("j")
    assert [job.job_id for job in state.jobs()] == ["k"] and state.rounds("j") == [] and state.updates("j") == []
    assert state.rejections("j") == [] and [u.job_id for u in state.open_uploads()] == ["k"]
    assert state.claim_finalization("j", 4.0) and not state.claim_finalization("k", 4.0)  # j's claim went with it
    keys = {key.key_id: key for key in state.api_keys()}
    assert keys["only-j"].jobs == () and keys["only-j"].revoked_at is not None
    assert keys["both"].jobs == ("k",) and keys["both"].revoked_at is None
    k = state.rounds("k")[0]
    assert (k.selected, [u.blob_sha256 for u in state.updates("k")], state.rejections("k")) == (
        ("c1",), ["k-d1"], [(0, "c2", "bad signature")])
    _start(state, "j", "{}")  # the id is free again, with nothing of the old job in it
    assert state.updates("j") == [] and state.rounds("j")[0].selected == ()


def test_only_a_job_that_failed_in_finalization_is_finalized_again(state):
    """A failed job with closed rounds and no open one (its training finished) goes back to finalizing, in a
    compare-and-set that drops its finalization's claim, so that one coordinator claims it again; a job that
    failed while training, or one that is not failed, is refused with the reason."""
    _start(state, "f", "{}")
    state.close_round("f", 0, updates=0, result_sha256="a1", reason="", artifacts_json="{}", last=True, now=2.0)
    assert state.claim_finalization("f", 3.0) and not state.claim_finalization("f", 3.0)  # the first claim wins
    state.set_job_status("f", "failed")  # as finalize_job records a failed finalization
    state.retry_finalization("f")
    assert state.job("f").status == "finalizing"
    with pytest.raises(PreconditionError, match="job f is finalizing: only a failed job's"):
        state.retry_finalization("f")
    assert state.claim_finalization("f", 4.0) and not state.claim_finalization("f", 4.0)
    assert state.claim_finalization("f", 5.0, take_over=True)  # a coordinator starting up redoes it
    _start(state, "t", "{}")
    state.close_round("t", 0, updates=0, result_sha256="b1", reason="", artifacts_json="{}", last=False, now=2.0)
    state.set_job_status("t", "failed")
    with pytest.raises(PreconditionError, match=r"job t failed during training \(its round 2 never closed\)"):
        state.retry_finalization("t")
    state.add_job("c", "{}", 1.0)
    state.set_job_status("c", "failed")
    with pytest.raises(PreconditionError, match="job c failed during training .before its first round."):
        state.retry_finalization("c")
    assert [state.job(j).status for j in ("t", "c")] == ["failed", "failed"]
    with pytest.raises(NotFoundError):
        state.retry_finalization("missing")
