"""API keys for the inference API: who may query which job's model (offsite.cloud.api_keys, `offsite cloud keys`)."""
import datetime as dt
import json
import subprocess
import sys
import time

import pytest

from offsite.cli import main as offsite_main
from offsite.cloud import api_keys
from offsite.cloud.api_keys import ExpiredKeyError, RevokedKeyError, UnknownKeyError, authenticate, create_key
from offsite.cloud.identity import StateLayout, hash_secret, init_state
from offsite.cloud.state import SqliteState
from offsite.errors import AuthError, ConfigError, NotFoundError
from tests.test_state import _start

NOW = 1_800_000_000.0


@pytest.fixture
def state():
    s = SqliteState(":memory:")
    _start(s, "j1", "{}")
    _start(s, "j2", "{}")
    return s


@pytest.fixture
def folder(tmp_path):
    """A state folder as `offsite cloud init` makes it, with one job."""
    init_state(tmp_path / "s", ["a"], ["localhost"], 3600)
    _start(StateLayout(tmp_path / "s").open_state(), "j1", "{}")
    return tmp_path / "s"


def test_a_new_key_authenticates_and_opens_only_its_jobs(state):
    secret, key = create_key(state, ["j1", "j1"], "alice", now=NOW)
    assert secret.startswith(f"osk-{key.key_id}.") and len(key.key_id) == 12 and int(key.key_id, 16) >= 0
    assert key.jobs == ("j1",) and key.label == "alice" and key.key_hash == hash_secret(secret)
    got = authenticate(state, secret, now=NOW + 1)
    assert got.key_id == key.key_id and got.last_used == NOW + 1
    assert api_keys.allowed(got, "j1") and not api_keys.allowed(got, "j2") and not api_keys.allowed(got, "j")
    assert state.api_keys() == [got]


def test_last_used_is_written_at_most_once_a_minute(state):
    secret, key = create_key(state, ["j1"], now=NOW)
    writes = []
    touch = state.touch_api_key
    state.touch_api_key = lambda key_id, now: (writes.append(now), touch(key_id, now))
    for dt in (0, 1, 30, 59.9, 60, 61, 200):
        authenticate(state, secret, now=NOW + dt)
    assert writes == [NOW, NOW + 60, NOW + 200]
    assert state.api_keys()[0].last_used == NOW + 200


def _revoked(state, secret, key):
    state.revoke_api_key(key.key_id)
    return secret


def _wrong_random_part(state, secret, key):
    return secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")


@pytest.mark.parametrize("name, make_secret, now, error, message", [
    ("unknown", lambda s, secret, key: "osk-000000000000." + "x" * 43, NOW, UnknownKeyError, "unknown API key"),
    ("wrong random part", _wrong_random_part, NOW, UnknownKeyError, "unknown API key"),
    ("empty", lambda s, secret, key: "", NOW, UnknownKeyError, "unknown API key"),
    ("no prefix", lambda s, secret, key: secret[4:], NOW, UnknownKeyError, "unknown API key"),
    ("bearer prefix left on", lambda s, secret, key: "Bearer " + secret, NOW, UnknownKeyError, "unknown API key"),
    ("oversized", lambda s, secret, key: secret + "x" * 10_000_000, NOW, UnknownKeyError, "unknown API key"),
    ("not ascii", lambda s, secret, key: "osk-\udcff", NOW, UnknownKeyError, "unknown API key"),
    ("not a string", lambda s, secret, key: None, NOW, UnknownKeyError, "unknown API key"),
    ("revoked", _revoked, NOW, RevokedKeyError, "API key {key_id} was revoked"),
    ("expired", lambda s, secret, key: secret, NOW + 7200, ExpiredKeyError, "API key {key_id} expired at 2027-01-15"),
    ("expired to the second", lambda s, secret, key: secret, NOW + 3600, ExpiredKeyError, "API key {key_id} expired"),
])
def test_refused_secrets_name_the_problem_without_the_secret(state, monkeypatch, name, make_secret, now, error, message):
    secret, key = create_key(state, ["j1"], expires_at=NOW + 3600, now=NOW)
    presented = make_secret(state, secret, key)
    hashed = []
    monkeypatch.setattr(api_keys, "hash_secret", lambda s: (hashed.append(len(s)), hash_secret(s))[1])
    with pytest.raises(error, match=message.format(key_id=key.key_id)) as e:
        authenticate(state, presented, now=now)
    assert isinstance(e.value, AuthError)
    assert all(n <= api_keys.MAX_SECRET_CHARS for n in hashed)  # nothing huge was hashed
    assert secret[17:] not in str(e.value) and (not presented or presented not in str(e.value))
    assert state.api_keys()[0].last_used is None  # a refused secret does not count as a use


@pytest.mark.parametrize("jobs, expires_at, error, message", [
    (["j1", "missing"], None, NotFoundError, "no job 'missing'"),
    ([], None, ConfigError, "at least one job"),
    (["j1"], NOW - 1, ConfigError, "not in the future"),
    (["j1"], NOW, ConfigError, "not in the future"),
])
def test_create_refuses_bad_grants_and_stores_nothing(state, jobs, expires_at, error, message):
    with pytest.raises(error, match=message):
        create_key(state, jobs, expires_at=expires_at, now=NOW)
    assert state.api_keys() == []


def test_the_secret_is_stored_nowhere_in_the_database(folder):
    state = StateLayout(folder).open_state()
    secrets = [create_key(state, ["j1"], label=f"user {i}")[0] for i in range(3)]
    rows = state._run("SELECT * FROM api_keys")
    assert len(rows) == 3
    for secret in secrets:
        random_part = secret.split(".", 1)[1]
        assert not any(random_part in str(value) for row in rows for value in row)
    raw = b"".join(p.read_bytes() for p in folder.glob("state.sqlite*"))  # the file and its WAL, byte for byte
    assert not any(s.split(".", 1)[1].encode() in raw for s in secrets)


def test_parse_expiry():
    midnight = dt.datetime(2027, 1, 31, tzinfo=dt.timezone.utc).timestamp()
    assert api_keys.parse_expiry("2027-01-31") == midnight  # as that day begins, UTC
    assert api_keys.parse_expiry("2027-01-31T12:00:00") == midnight + 12 * 3600
    assert api_keys.parse_expiry("2027-01-31T12:00:00+02:00") == midnight + 10 * 3600
    with pytest.raises(ConfigError, match="date like 2027-01-31"):
        api_keys.parse_expiry("next tuesday")


def _created(out: str) -> tuple[str, str]:
    """(secret, key id) from what `keys create` printed."""
    secret = next(line for line in out.splitlines() if line.startswith("osk-"))
    return secret, secret[4:16]


def test_cli_create_list_revoke(folder, capsys):
    assert offsite_main(["cloud", "keys", "create", "--state", str(folder), "--job", "j1", "--label", "alice",
                         "--expires-in-days", "30"]) == 0
    out = capsys.readouterr().out
    secret, key_id = _created(out)
    assert "shown only once" in out and f"API key {key_id} for job(s) j1" in out
    assert out.count(secret) == 1
    state = StateLayout(folder).open_state()
    key = authenticate(state, secret)
    assert key.key_id == key_id and 29.9 * 86400 < key.expires_at - time.time() <= 30 * 86400

    assert offsite_main(["cloud", "keys", "create", "--state", str(folder), "--job", "j1", "--expires",
                         "2099-01-31"]) == 0
    second, second_id = _created(capsys.readouterr().out)
    assert authenticate(state, second).expires_at == api_keys.parse_expiry("2099-01-31")

    assert offsite_main(["cloud", "keys", "list", "--state", str(folder)]) == 0
    listed = capsys.readouterr().out
    assert f"key {key_id}: active; jobs j1; label 'alice'" in listed and f"key {second_id}: active" in listed
    assert "expires 2099-01-31 00:00:00 UTC" in listed and "revoked no" in listed
    assert offsite_main(["cloud", "keys", "list", "--state", str(folder), "--json"]) == 0
    listed_json = capsys.readouterr().out
    rows = json.loads(listed_json)
    assert [r["key_id"] for r in rows] == [key_id, second_id] and rows[0]["jobs"] == ["j1"]
    assert set(rows[0]) == {"key_id", "jobs", "label", "status", "created_at", "expires_at", "revoked_at", "last_used"}
    for text in (listed, listed_json):
        for s in (secret, second):
            assert s not in text and s.split(".", 1)[1] not in text and hash_secret(s) not in text

    assert offsite_main(["cloud", "keys", "revoke", "--state", str(folder), key_id]) == 0
    assert f"API key {key_id} revoked" in capsys.readouterr().out
    with pytest.raises(RevokedKeyError):
        authenticate(state, secret)
    authenticate(state, second)
    assert offsite_main(["cloud", "keys", "list", "--state", str(folder)]) == 0
    assert f"key {key_id}: revoked;" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["create", "--job", "nope"], "no job 'nope'"),
    (["create", "--job", "j1", "--expires", "2001-01-01"], "not in the future"),
    (["create", "--job", "j1", "--expires", "soon"], "date like 2027-01-31"),
    (["create", "--job", "j1", "--expires-in-days", "0"], "--expires-in-days must be positive"),
    (["revoke", "0123456789ab"], "no API key '0123456789ab'"),
    (["revoke", "osk-0123456789ab.secretpart"], "not the secret"),
])
def test_cli_errors_name_the_problem(folder, capsys, argv, message):
    assert offsite_main(["cloud", "keys", argv[0], "--state", str(folder), *argv[1:]]) == 1
    err = capsys.readouterr().err
    assert message in err and "secretpart" not in err


def test_cli_keys_do_not_load_torch(folder):
    """Like `clients revoke`: an owner handing out keys should not wait for torch to import."""
    code = ("import sys; from offsite.cli import main; "
            f"assert main(['cloud', 'keys', 'list', '--state', {str(folder)!r}]) == 0; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]"
