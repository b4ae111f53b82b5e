"""Several jobs at once: rosters, identities that belong to the coordinator, a client that works through
every job it is on; driven as plain objects, then as real processes."""
import json
import subprocess
import time

import pytest

from offsite.cloud.coordinator import Coordinator
from offsite.cloud.identity import issue_tokens
from offsite.cloud.job import Artifacts, JobConfig
from offsite.demo.tiny import make_tiny_model
from offsite.errors import AlreadyExistsError, ConfigError, NotFoundError, PreconditionError
from offsite.files import sha256_file
from tests.procs import offsite, run_clients, serve_until_done
from tests.test_rounds import make_world


@pytest.fixture
def two_jobs(tiny_model, tmp_path):
    """Job j (every client, 2 a round) and job k (only c2 and c3, 1 a round, 1 round; its own emulator, so its
    bundle is its own blob), made after enrollment."""
    c, clock, clients, done = make_world(tiny_model, tmp_path, clients_per_round=2, min_clients=None, round_timeout_s=0)
    c.create_job(JobConfig(job_id="k", base_model=str(tiny_model), emulator_layers=2, rounds=1, clients_per_round=1,
                           clients=("c2", "c3")))
    return c, {cl.name: cl for cl, _ in clients}


def test_a_job_that_cannot_fill_a_round_is_warned_about(two_jobs, tiny_model, caplog):
    """The roster counts enrolled clients and issued tokens; a job needing more updates per round than that
    many clients says so when it is made, and what will happen."""
    c, _ = two_jobs
    assert c.admin.roster(c.job("k").config) == {"c2", "c3"}
    with caplog.at_level("WARNING", logger="offsite.cloud"):
        c.create_job(JobConfig(job_id="big", base_model=str(tiny_model), emulator_layers=1, clients_per_round=4))
        c.create_job(JobConfig(job_id="few", base_model=str(tiny_model), emulator_layers=1, clients_per_round=2,
                               clients=("c1",), round_timeout_s=60, min_clients=1))
        c.create_job(JobConfig(job_id="fits", base_model=str(tiny_model), emulator_layers=1, clients_per_round=3))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2
    assert "job big needs 4 updates" in warned[0] and "3 client(s) can take part (c1, c2, c3)" in warned[0]
    assert "no round will close" in warned[0]
    assert "job few needs 2 updates" in warned[1] and "close only at round_timeout_s (60 s)" in warned[1]


def test_artifacts_read_the_json_that_state_databases_hold():
    """A job's artifacts as an older state database stored them (no upload_dtype, none of the keys a job
    gains later) read with their defaults; what a round close writes back reads the same."""
    stored = {"manifest": "m" * 64, "bundle_files": {"offsite-manifest.json": "m" * 64}, "bundle_dir": "/jobs/j/bundle",
              "plan": {"num_blocks": 4, "bottom": 1, "top": 1, "kept_middle": [2]}, "spec": {"w": [[2, 3], "float32"]},
              "update_spec": {"w": [[2, 3], "float32"]}, "skeleton_digest": "d" * 64,
              "params": {"full": 10, "emulator": 8, "adapter": 4}}
    art = Artifacts.from_json(json.dumps(stored))
    assert (art.upload_dtype, art.secagg_shapes, art.strategy_state, art.dp_norms) == ("float32", None, None, None)
    assert art.plan.kept_middle == (2,) and art.update_spec == stored["update_spec"]
    assert json.loads(art.to_json()) == {**stored, "upload_dtype": "float32"}
    later = Artifacts.from_json(json.dumps({**stored, "upload_dtype": "bfloat16", "secagg_shapes": {"w": [2, 3]},
                                            "strategy_state": "s" * 64, "dp_norms": [[0.5, 1.0]]}))
    assert Artifacts.from_json(later.to_json()) == later


def test_a_roster_limits_who_is_selected_and_who_may_ask(two_jobs):
    c, by_name = two_jobs
    c.tick()
    assert {c.state.client(i).name for i in c.state.round("k", 0).selected} <= {"c2", "c3"}
    assert len(c.state.round("k", 0).selected) == 1
    with pytest.raises(PreconditionError, match="not on the roster of job k"):
        c.task(by_name["c1"], "k")
    assert [job.job_id for job in c.jobs_of(by_name["c1"])] == ["j"]
    assert [job.job_id for job in c.jobs_of(by_name["c2"])] == ["j", "k"]


def test_the_next_task_walks_the_clients_jobs_oldest_first(two_jobs):
    c, by_name = two_jobs
    c.tick()
    (k_client,) = c.state.round("k", 0).selected
    on_both = c.state.client(k_client)
    in_j = set(c.state.round("j", 0).selected)
    first = c.next_task(on_both)
    assert first.kind == "train" and first.job_id == ("j" if k_client in in_j else "k")
    c1 = by_name["c1"]
    assert c.next_task(c1).kind == ("train" if c1.client_id in in_j else "wait")


def test_blobs_are_offered_only_to_clients_on_a_running_jobs_roster(two_jobs):
    c, by_name = two_jobs
    k_bundle = c.job("k").artifacts.manifest
    assert c.blob_info(by_name["c2"], k_bundle)[0] > 0
    with pytest.raises(NotFoundError, match="not offered"):
        c.blob_info(by_name["c1"], k_bundle)   # c1 is not on job k's roster
    c.cancel_job("k")
    with pytest.raises(NotFoundError, match="not offered"):
        c.blob_info(by_name["c2"], k_bundle)   # nor is a job that no longer runs


def test_a_client_with_no_job_yet_waits_and_one_whose_jobs_are_over_is_done(tiny_model, tmp_path):
    c, _, clients, _ = make_world(tiny_model, tmp_path, rounds=1, clients=("c1",))
    c2 = clients[1][0]
    assert c.next_task(c2).kind == "wait" and c.state.client(c2.client_id).activity == "on no job's roster yet"
    c.cancel_job("j")
    c1 = clients[0][0]
    assert c.next_task(c1).kind == "done"


def test_enrollment_needs_no_job_and_new_clients_get_tokens(tmp_path):
    from offsite.cloud.coordinator import Coordinator
    from offsite.cloud.identity import StateLayout, init_state
    from tests.test_rounds import _enroll
    layout = StateLayout(tmp_path / "state")
    tokens = init_state(layout.root, ["alice"], ["localhost"], 3600)
    c = Coordinator.open(layout.root)
    assert _enroll(c, tokens["alice"], "alice")[0].job_id == ""  # no job yet: a client can still enroll
    more = issue_tokens(layout, c.state, ["bob", "carol.lab-2"], 3600)
    assert sorted(more) == ["bob", "carol.lab-2"] and oct(more["bob"].stat().st_mode & 0o777) == "0o600"
    assert _enroll(c, more["bob"], "bob")[0].client_id.startswith("bob-")
    with pytest.raises(AlreadyExistsError, match="alice"):
        issue_tokens(layout, c.state, ["alice"], 3600)   # enrolled already
    with pytest.raises(AlreadyExistsError, match="carol"):
        issue_tokens(layout, c.state, ["carol.lab-2"], 3600)   # a token was issued already
    for bad in ("../x", "", "a b", "-lead"):
        with pytest.raises(ConfigError, match="client names must match"):
            issue_tokens(layout, c.state, [bad], 3600)
    with pytest.raises(ConfigError, match="distinct client names"):
        JobConfig(job_id="x", base_model="m", clients=("bob", "bob"))


def test_two_jobs_with_different_bases_and_overlapping_rosters_run_to_completion(tiny_model, client_data, tmp_path):
    """Real processes: job A on the tiny model for both clients, job B on another base for the second
    client only, and job C that can never close (its one client cannot make 2 updates), cancelled from
    the command line once its client sent one. Both clients run without --job and exit 0 once their
    jobs are over; the coordinator exits when every job is done or cancelled. Job A re-aligns its
    emulator after round 1 (FedBiOT): both clients download the patch and train round 2 on it."""
    state, names = tmp_path / "state", [f.name for f in client_data]
    other_base = make_tiny_model(tmp_path / "other-base", num_layers=5, hidden_size=48, seed=1)
    subprocess.run(offsite("cloud", "init", "--state", str(state), "--clients", ",".join(names)), check=True)
    jobs = {"a": (tiny_model, names, 2), "b": (other_base, names[1:], 1), "c": (tiny_model, names[:1], 2)}
    realign = f'realign_every = 1\nrealign_steps = 3\nrealign_data = "{client_data[0] / "train.jsonl"}"\n'
    for job_id, (base, roster, per_round) in jobs.items():
        (tmp_path / f"{job_id}.toml").write_text(
            f'[job]\nid = "{job_id}"\nbase_model = "{base}"\nrounds = 2\nclients_per_round = {per_round}\n'
            f'clients = {json.dumps(roster)}\n[split]\nemulator_layers = 1\n{realign if job_id == "a" else ""}'
            f'[training]\nbatch_size = 8\n')
        subprocess.run(offsite("cloud", "jobs", "create", "--state", str(state), "--config", str(tmp_path / f"{job_id}.toml")),
                       check=True)
    server, ports = serve_until_done(state, tmp_path / "port")
    try:
        clients = run_clients(state, ports, client_data, tmp_path)

        def show(job_id):
            out = subprocess.run(offsite("cloud", "jobs", "show", job_id, "--state", str(state), "--json"),
                                 capture_output=True, text=True, check=True).stdout
            return json.loads(out)
        deadline = time.time() + 240
        while show("c")["round_log"][0]["updates"] < 1:
            assert time.time() < deadline, "job c never got its update"
            time.sleep(0.5)
        subprocess.run(offsite("cloud", "jobs", "cancel", "c", "--state", str(state)), check=True)
        for c in clients:
            _, err = c.communicate(timeout=300)
            assert c.returncode == 0, err
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
    a, b, cancelled = show("a"), show("b"), show("c")
    assert (a["status"], b["status"], cancelled["status"]) == ("done", "done", "cancelled")
    ids = {r["client_id"] for r in a["updates"]}
    assert len(ids) == 2 and [len(r["selected"]) for r in a["round_log"]] == [2, 2]
    (second,) = {r["client_id"] for r in b["updates"]}  # job b: only the second client, in both rounds
    assert second.startswith(names[1]) and [r["updates"] for r in b["round_log"]] == [1, 1]
    assert [r["status"] for r in cancelled["round_log"]] == ["open"] and cancelled["round_log"][0]["updates"] == 1
    for job_id in ("a", "b"):
        assert (state / "jobs" / job_id / "report.json").is_file()
    patch = Coordinator.open(state).job("a").artifacts.emulator_patch  # the one re-alignment, after round 1
    for f in client_data:
        assert sha256_file(tmp_path / f.name / "jobs" / "a" / "emulator-patch.safetensors") == patch
    assert not (tmp_path / names[1] / "jobs" / "b" / "emulator-patch.safetensors").exists()


def test_a_job_is_created_while_its_emulator_is_built_and_a_failed_creation_leaves_none(tiny_model, tmp_path, monkeypatch):
    """While create_job builds, the job is listed as created and its roster's clients are told to wait (not
    done, not train); a creation that fails leaves no job, and the id can be used again."""
    from offsite.cloud import job_admin
    from offsite.cloud.status import read_status
    c, _, clients, _ = make_world(tiny_model, tmp_path, rounds=1, clients=("c1",))
    c2 = clients[1][0]  # on no job's roster so far
    seen, real_build = {}, job_admin.build

    def build(*args, **kwargs):  # what the coordinator shows while the emulator is being built
        seen["status"] = {j["job_id"]: j["status"] for j in read_status(c)["jobs"]}
        seen["task"] = c.next_task(c2)
        seen["activity"] = c.state.client(c2.client_id).activity
        return real_build(*args, **kwargs)

    monkeypatch.setattr(job_admin, "build", build)
    cfg = JobConfig(job_id="k", base_model=str(tiny_model), emulator_layers=1, rounds=1, clients_per_round=1, clients=("c2",))
    c.create_job(cfg)
    assert seen["status"] == {"j": "running", "k": "created"}
    assert (seen["task"].kind, seen["task"].job_id, seen["task"].retry_after_s) == ("wait", "k", 10.0)
    assert seen["activity"] == "waiting for the job to be created of job k"
    assert c.job("k").status == "running" and c.state.global_adapters("k") and c.next_task(c2).kind in ("train", "wait")

    def broken(*args, **kwargs):
        raise ConfigError("the base model has no such layers")

    monkeypatch.setattr(job_admin, "build", broken)
    with pytest.raises(ConfigError, match="no such layers"):
        c.create_job(JobConfig(job_id="m", base_model=str(tiny_model), emulator_layers=1))
    assert [j.job_id for j in c.state.jobs()] == ["j", "k"]  # nothing left of m
    monkeypatch.setattr(job_admin, "build", real_build)
    c.create_job(JobConfig(job_id="m", base_model=str(tiny_model), emulator_layers=1))
    assert c.job("m").status == "running"
    with pytest.raises(AlreadyExistsError, match="job m already exists"):
        c.create_job(JobConfig(job_id="m", base_model=str(tiny_model), emulator_layers=1))
