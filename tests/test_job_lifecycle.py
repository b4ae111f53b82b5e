"""A job's life after training, from the command line in-process: deleting one (its id, folder and blobs, never
what another job shares), finalizing one again after its finalization failed, and the time left in `status`."""
import logging

import pytest

from offsite.cli import main
from offsite.cloud import finalize
from offsite.cloud.job import JobConfig
from offsite.cloud.state import RoundRecord, UploadRecord
from offsite.cloud import status_page
from offsite.cloud.status import describe_eta, read_status, round_eta
from offsite.files import sha256_file
from tests.test_client_check import cli
from tests.test_rounds import _upload, make_world

log = logging.getLogger("offsite.cloud")


def refused(capsys, *args) -> tuple[int, str]:
    """An `offsite` command expected to fail: its exit code and what it wrote to stderr."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def train(c, clients) -> None:
    """The client selected for job j's open round uploads an update of its own; the round closes."""
    (chosen,) = c.state.round("j", c.job("j").round).selected
    _upload(c, *next(pair for pair in clients if pair[0].client_id == chosen), c.job("j").round, shift=0.5)


def blobs_of(c, job_id: str) -> set[str]:
    return c.admin.named_blobs(c.state.job(job_id))


def job_file(tmp_path, tiny_model, job_id: str, emulator_layers: int):
    path = tmp_path / f"{job_id}.toml"
    path.write_text(f'[job]\nid = "{job_id}"\nbase_model = "{tiny_model}"\nrounds = 1\n'
                    f'[split]\nemulator_layers = {emulator_layers}\n')
    return path


@pytest.fixture
def twins(tiny_model, tmp_path):
    """Job j (1 round, 1 update a round) and job k, made after it with the same base and emulator: the two share
    their bundle files and first global adapter, which the blob store holds once."""
    c, clock, clients, done = make_world(tiny_model, tmp_path, rounds=1, clients_per_round=1, min_clients=None,
                                         round_timeout_s=0)
    c.create_job(JobConfig(job_id="k", base_model=str(tiny_model), emulator_layers=1, rounds=2, clients_per_round=1))
    shared = blobs_of(c, "j") & blobs_of(c, "k")
    assert {c.job("k").artifacts.manifest, c.state.global_adapters("k")[0]} <= shared
    return c, clients


def intact(c, job_id: str) -> bool:
    """Every blob the job names is there with the bytes its name promises."""
    return all(sha256_file(c.blobs.open_path(d)) == d for d in blobs_of(c, job_id))


def test_deleting_a_job_frees_its_id_folder_and_blobs_but_not_what_another_job_shares(twins, tiny_model, tmp_path,
                                                                                        capsys):
    c, clients = twins
    state = c.layout.root
    train(c, clients)  # j's one round closes with an update of its own: j is finalizing
    assert c.job("j").status == "finalizing"
    code, err = refused(capsys, "cloud", "jobs", "delete", "--state", state, "j")
    assert code == 1 and "job j is finalizing: delete it once it is done or failed" in err
    code, err = refused(capsys, "cloud", "jobs", "delete", "--state", state, "k")
    assert code == 1 and "job k is running: `offsite cloud jobs cancel k` first" in err
    c.state.set_job_status("j", "failed")
    c.state.open_upload(UploadRecord("a" * 32, "j", 0, "c2", 10, 1000, "d" * 64))  # one that never completed
    c.intake.spool.create("a" * 32)
    only_j = blobs_of(c, "j") - blobs_of(c, "k")
    assert only_j == {c.state.updates("j")[0].blob_sha256, c.state.global_adapters("j")[-1]}  # (one: the mean of one)

    out = cli("cloud", "jobs", "delete", "--state", state, "j")
    assert f"job j deleted: its state, its folder and {len(only_j)} blobs" in out
    assert [j.job_id for j in c.state.jobs()] == ["k"] and not (c.layout.jobs / "j").exists()
    assert not any(c.blobs.path(d).exists() for d in only_j) and c.intake.spool.ids() == []
    assert intact(c, "k") and (c.layout.jobs / "k" / "bundle").is_dir()
    cli("cloud", "jobs", "create", "--state", state, "--config", job_file(tmp_path, tiny_model, "j", 1))
    assert c.job("j").status == "running" and intact(c, "j") and intact(c, "k")

    c.state.add_job("half", JobConfig(job_id="half", base_model=str(tiny_model)).to_json(), 1.0)  # a creation killed midway
    code, err = refused(capsys, "cloud", "jobs", "delete", "--state", state, "half")
    assert code == 1 and "job half is created: its emulator is being built, or its creation was killed: " \
                         "`offsite cloud jobs cancel half` first" in err
    cli("cloud", "jobs", "cancel", "--state", state, "half")
    assert "0 blobs" in cli("cloud", "jobs", "delete", "--state", state, "half")
    assert [j.job_id for j in c.state.jobs()] == ["k", "j"] and intact(c, "j") and intact(c, "k")


def test_a_job_id_left_by_a_delete_cut_short_is_made_again_without_touching_shared_blobs(twins, tiny_model, tmp_path):
    """A crash right after the state's transaction leaves j's folder, whose bundle files are hard links to the
    blobs j shares with k; making j again with another emulator writes a fresh bundle, not through those links."""
    c, _ = twins
    c.cancel_job("j")
    c.state.delete_job("j")  # the rows alone: what a crash before the files leaves
    assert (c.layout.jobs / "j" / "bundle" / "config.json").is_file()
    cli("cloud", "jobs", "create", "--state", c.layout.root, "--config", job_file(tmp_path, tiny_model, "j", 2))
    assert c.job("j").artifacts.plan.kept_middle != c.job("k").artifacts.plan.kept_middle
    assert intact(c, "k") and intact(c, "j")


def test_a_failed_finalization_runs_again_on_the_coordinator_that_serves(twins, capsys, monkeypatch):
    """`jobs finalize` sends a job whose finalization failed back to finalizing; serve's poll (each second)
    claims and finalizes it once. A job that failed while training is refused with the reason."""
    c, clients = twins
    state = c.layout.root
    train(c, clients)
    real = finalize.finalize

    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(finalize, "finalize", broken)
    finalizer = finalize.Finalizer(c, log)
    finalizer.poll()  # what serve's loop does; here it also stands for the closing coordinator's own start
    finalizer.threads[0].join()
    assert c.job("j").status == "failed"
    finalizer.poll()
    assert len(finalizer.threads) == 1  # a failed job is not finalized again by itself

    monkeypatch.setattr(finalize, "finalize", real)
    out = cli("cloud", "jobs", "finalize", "--state", state, "j")
    assert "job j is finalizing again: a running `offsite cloud serve" in out and c.job("j").status == "finalizing"
    finalizer.poll()
    finalizer.poll()  # claimed once: one finalization
    assert len(finalizer.threads) == 2
    finalizer.threads[1].join()
    assert c.job("j").status == "done" and (c.layout.jobs / "j" / "report.json").is_file()

    c.state.set_job_status("k", "failed")  # as if its training had failed in round 1
    code, err = refused(capsys, "cloud", "jobs", "finalize", "--state", state, "k")
    assert code == 1 and "job k failed during training (its round 1 never closed): there is no trained adapter" in err
    code, err = refused(capsys, "cloud", "jobs", "finalize", "--state", state, "j")
    assert code == 1 and "job j is done: only a failed job's finalization can run again" in err


def rnd(r: int, opened: float, closed: float | None) -> RoundRecord:
    return RoundRecord("j", r, "open" if closed is None else "closed", "a", opened, closed_at=closed)


def test_round_eta_from_the_rounds_times():
    """The mean closed round, counted off the open round's time so far; 0 once training is over; None without a
    closed round or for a job that no longer trains; never negative, and finite."""
    rounds = [rnd(0, 100.0, 130.0), rnd(1, 130.0, 180.0), rnd(2, 180.0, None)]
    assert round_eta(rounds, 5, "running", 190.0) == {"round_s": 40.0, "eta_s": 30.0 + 2 * 40.0}
    assert round_eta(rounds, 5, "running", 500.0) == {"round_s": 40.0, "eta_s": 80.0}  # the open round is late
    assert round_eta(rounds, 5, "cancelled", 190.0)["eta_s"] is None
    assert round_eta(rounds[:1] + [rnd(1, 130.0, None)], 2, "running", 130.0)["eta_s"] == 30.0
    assert round_eta([rnd(0, 100.0, None)], 3, "running", 150.0) == {"round_s": None, "eta_s": None}
    assert round_eta([rnd(0, 100.0, 130.0), rnd(1, 130.0, 150.0)], 2, "done", 900.0) == {"round_s": 25.0, "eta_s": 0.0}
    assert round_eta([rnd(0, 0.0, 0.0), rnd(1, 0.0, None)], 3, "running", 10.0) == {"round_s": None, "eta_s": None}
    assert round_eta([], 3, "created", 10.0) == {"round_s": None, "eta_s": None}


def test_status_shows_each_jobs_round_time_and_time_left(tiny_model, tmp_path):
    c, clock, clients, _ = make_world(tiny_model, tmp_path, rounds=3, clients_per_round=1, min_clients=None,
                                      round_timeout_s=0)  # round 0 opened at the clock's 1000 s
    clock.t += 30
    train(c, clients)  # round 0 took 30 s
    clock.t += 10
    (j,) = read_status(c)["jobs"]
    assert (j["round_s"], j["eta_s"]) == (30.0, 20.0 + 30.0)
    assert describe_eta(j) == "rounds take 30 s on average; training ends in about 50 s"
    assert "<p>Rounds take 30 s on average; training ends in about 50 s.</p>" in status_page.render(read_status(c))
    out = cli("cloud", "status", "--state", c.layout.root)  # its clock is the real one: round 1 is long overdue
    assert "  rounds take 30 s on average; training ends in about 30 s" in out
