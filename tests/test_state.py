"""Contract test: every State implementation behaves the same."""
import time

import pytest

from offsite.cloud.state import SqliteState, UpdateRecord, open_state, redact
from offsite.errors import AlreadyExistsError, ConfigError, NotFoundError
from tests import postgres


@pytest.fixture(scope="session")
def postgres_server():
    why = postgres.unavailable()
    if why:
        pytest.skip(why)
    server = postgres.Server()
    yield server
    server.stop()


IMPLEMENTATIONS = {
    "sqlite-file": lambda request, tmp: SqliteState(tmp / "state.sqlite"),
    "sqlite-memory": lambda request, tmp: SqliteState(":memory:"),
    "sqlite-url": lambda request, tmp: open_state(f"sqlite:///{tmp / 'state.sqlite'}"),
    "postgresql": lambda request, tmp: open_state(request.getfixturevalue("postgres_server").new_database()),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def state(request, tmp_path):
    return IMPLEMENTATIONS[request.param](request, tmp_path)


def test_tokens_are_single_use_and_expire(state):
    now = time.time()
    state.add_token("h1", "client-1", now + 60)
    state.add_token("h2", "client-2", now - 1)
    assert state.consume_token("h1", now) == "client-1"
    assert state.consume_token("h1", now) is None
    assert state.consume_token("h2", now) is None
    assert state.consume_token("nope", now) is None


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
    state.add_job("j", "{}", "{}")
    with pytest.raises(AlreadyExistsError):
        state.add_job("j", "{}", "{}")
    assert state.add_update(UpdateRecord("j", 0, "c1", 10, "d1", 100)) == 1
    assert state.add_update(UpdateRecord("j", 0, "c2", 20, "d2", 100)) == 2
    with pytest.raises(AlreadyExistsError):
        state.add_update(UpdateRecord("j", 0, "c1", 10, "d3", 100))
    assert [u.client_id for u in state.updates("j", 0)] == ["c1", "c2"]
    state.update_job("j", round=1, status="finalizing")
    job = state.job("j")
    assert (job.round, job.status) == (1, "finalizing")
    with pytest.raises(NotFoundError):
        state.job("missing")


def test_rejections_recorded(state):
    state.add_rejection("j", 0, "c1", "bad signature")
    assert state.rejections("j") == [(0, "c1", "bad signature")]


def test_sqlite_state_survives_reopen(tmp_path):
    first = SqliteState(tmp_path / "s.sqlite")
    first.add_job("j", "{}", "{}")
    first.add_update(UpdateRecord("j", 0, "c1", 10, "d1", 100))
    again = SqliteState(tmp_path / "s.sqlite")
    assert len(again.updates("j")) == 1 and again.job("j").status == "running"


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


def test_train_loss_and_bytes_round_trip(state):
    state.add_job("j", "{}", "{}")
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
