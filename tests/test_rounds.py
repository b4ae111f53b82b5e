"""Rounds never hang: a deadline after the first update closes a round with min_clients updates; late
updates are refused. Driven through the Coordinator with an injected clock (no network)."""
import hashlib
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography import x509
from cryptography.x509.oid import NameOID

from offsite.cloud import selection
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.intake import UploadHeader
from offsite.cloud.identity import StateLayout, init_state, load_sealing_key
from offsite.cloud.job import JobConfig
from offsite.cloud.status import read_status
from offsite.errors import ConfigError, InvalidUpdateError, PreconditionError
from offsite.sealing import SealContext, raw_public, seal
from offsite.tensors import from_bytes, to_bytes

NAMES = ["c1", "c2", "c3"]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_world(tiny_model, tmp_path, db_url=None, **job):
    layout = StateLayout(tmp_path / "state")
    tokens = init_state(layout.root, NAMES, ["localhost"], 3600, db_url)
    clock, done = Clock(), []
    c = Coordinator.open(layout.root, on_training_done=done.append, clock=clock)
    settings = {"rounds": 2, "clients_per_round": 3, "min_clients": 2, "round_timeout_s": 60, **job}
    c.create_job(JobConfig(job_id="j", base_model=str(tiny_model), emulator_layers=1, **settings))
    clients = []
    for name in NAMES:
        e, signer = _enroll(c, tokens[name], name)
        clients.append((c.authenticate(e.client_id), signer))
    c.tick()  # the round worker selects the enrolled clients for round 0
    return c, clock, clients, done


def _enroll(c, token_file, name):
    """Enroll with the token in `token_file`: (the enrollment, the client's signing key)."""
    signer = Ed25519PrivateKey.generate()
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return c.enroll(Path(token_file).read_text().strip(), raw_public(signer.public_key()), csr), signer


@pytest.fixture
def world(tiny_model, tmp_path):
    return make_world(tiny_model, tmp_path)


def _sealed(c, client, signer, round_, payload: bytes) -> bytes:
    """`payload` sealed as `client`'s update for `round_` of job j."""
    return seal(payload, SealContext("j", round_, client.client_id, c.job("j").artifacts.skeleton_digest),
                load_sealing_key(c.layout).public_key(), signer)


def _upload(c, client, signer, round_, shift=0.0, train_loss=None, examples=10, tick=True):
    """Submit an update, then (unless `tick` is False) run the round worker's step, as the server does at once."""
    adapter = c.blobs.get(c.state.global_adapters("j")[0])
    if shift:
        adapter = to_bytes({k: v + shift for k, v in from_bytes(adapter).items()})
    envelope = _sealed(c, client, signer, round_, adapter)
    header = UploadHeader("j", round_, examples, len(envelope), hashlib.sha256(envelope).hexdigest(), train_loss)
    accepted = c.submit_update(client, header, envelope)
    if tick:
        c.tick()
    return accepted


def test_round_closes_at_its_deadline_with_min_clients_and_late_update_is_refused(world):
    c, clock, clients, _ = world
    _upload(c, *clients[0], 0)
    clock.t += 30
    _upload(c, *clients[1], 0)
    clock.t += 29  # 59 s after the first update: not yet
    c.tick()
    assert c.job("j").round == 0
    clock.t += 2
    c.tick()
    assert c.job("j").round == 1 and len(c.state.global_adapters("j")) == 2  # closed with 2 of 3, aggregated
    assert c.state.round("j", 0).reason.startswith("deadline of 60 s passed with 2 updates")
    with pytest.raises(PreconditionError, match="for round 1 "):
        _upload(c, *clients[2], 0)  # the client that was too slow
    assert [u.client_id for u in c.state.updates("j", 0)] == [clients[0][0].client_id, clients[1][0].client_id]


def test_deadline_without_min_clients_keeps_waiting(world):
    c, clock, clients, _ = world
    _upload(c, *clients[0], 0)
    clock.t += 3600
    c.tick()
    assert c.job("j").round == 0  # 1 < min_clients: the round waits
    _upload(c, *clients[1], 0, tick=False)  # the second update arrives after the deadline: the next tick closes the round
    assert c.job("j").round == 0 and c.wake.is_set()
    c.tick()
    assert c.job("j").round == 1


def test_a_dead_client_never_blocks_the_job(world):
    c, clock, clients, done = world
    for round_ in range(2):
        _upload(c, *clients[0], round_)
        _upload(c, *clients[1], round_)  # clients[2] never returns
        clock.t += 61
        c.tick()
    assert done == ["j"] and c.job("j").status == "finalizing"


def test_reads_never_close_a_round_and_an_update_before_the_tick_counts(world):
    c, clock, clients, _ = world
    _upload(c, *clients[0], 0)
    _upload(c, *clients[1], 0)
    clock.t += 120  # past the deadline, but no tick ran: a read must not close the round
    assert c.task(clients[2][0], "j").kind == "train" and c.job("j").round == 0
    _upload(c, *clients[2], 0)  # so the slow client's update still counts
    assert c.job("j").round == 1 and len(c.state.updates("j", 0)) == 3


def test_full_round_still_closes_at_once(world):
    c, _, clients, _ = world
    for client in clients:
        _upload(c, *client, 0)
    assert c.job("j").round == 1 and len(from_bytes(c.blobs.get(c.state.global_adapters("j")[1]))) > 0


@pytest.mark.parametrize("kwargs", [{"min_clients": 0}, {"min_clients": 4}, {"round_timeout_s": -1}])
def test_bad_round_settings(kwargs):
    with pytest.raises(ConfigError):
        JobConfig(job_id="j", base_model="m", clients_per_round=3, **kwargs)


def test_norm_bound_rejects_a_far_update_with_its_reason(tiny_model, tmp_path):
    c, _, clients, _ = make_world(tiny_model, tmp_path, max_update_norm=1.0)
    n = sum(v.numel() for v in from_bytes(c.blobs.get(c.state.global_adapters("j")[0])).values())
    _upload(c, *clients[0], 0, shift=0.5 / n ** 0.5)  # L2 norm 0.5: inside the bound
    with pytest.raises(InvalidUpdateError, match="L2 norm 2, above the job.s bound 1"):
        _upload(c, *clients[1], 0, shift=2.0 / n ** 0.5)
    assert [u.client_id for u in c.state.updates("j")] == [clients[0][0].client_id]
    assert "above the job's bound" in c.state.rejections("j")[0][2]


def test_fedavgm_keeps_momentum_between_rounds(tiny_model, tmp_path):
    c, _, clients, _ = make_world(tiny_model, tmp_path, clients_per_round=1, min_clients=None, round_timeout_s=0,
                                  aggregator="fedavgm", aggregator_params={"server_lr": 1.0, "momentum": 0.5})
    start, by_id = from_bytes(c.blobs.get(c.state.global_adapters("j")[0])), {cl.client_id: (cl, k) for cl, k in clients}
    for round_ in range(2):
        (selected,) = c.state.round("j", round_).selected  # one seat a round
        _upload(c, *by_id[selected], round_, shift=1.0)  # each round the client sends the original adapter + 1
    name = next(iter(start))
    after1, after2 = (from_bytes(c.blobs.get(d))[name] for d in c.state.global_adapters("j")[1:3])
    assert torch.allclose(after1, start[name] + 1.0)  # v = 1; global + 1
    assert torch.allclose(after2, start[name] + 1.5)  # delta = (start + 1) - (start + 1) = 0; v = 0.5; global + 0.5
    assert c.job("j").artifacts.strategy_state is not None


def test_a_method_the_model_cannot_run_is_refused_when_the_job_is_made(tiny_model, tmp_path, monkeypatch):
    """Prefix tuning hands every attention layer keys and values it did not compute. An attention that cannot
    take them (Falcon's, made to refuse them here, as peft's prefix tuning once failed on its fused
    multi-query attention) fails the job at `jobs create`, naming the method, the model type and the cause;
    the same model takes a method that leaves the attention's inputs alone."""
    import shutil
    from transformers.models.falcon import modeling_falcon
    from offsite.emulator.support import tiny
    original = modeling_falcon.FalconAttention.forward

    def no_prefix(self, hidden_states, *args, layer_past=None, **kwargs):
        if layer_past is not None and layer_past.get_seq_length(self.layer_idx) > 0:
            raise RuntimeError("this attention takes no keys and values from outside")
        return original(self, hidden_states, *args, layer_past=layer_past, **kwargs)

    monkeypatch.setattr(modeling_falcon.FalconAttention, "forward", no_prefix)
    folder = tmp_path / "falcon"
    tiny("falcon").save_pretrained(str(folder))
    for f in tiny_model.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    with pytest.raises(ConfigError, match="prefix does not run on model type 'falcon': RuntimeError: this attention takes no"):
        make_world(folder, tmp_path / "w", method="prefix")
    c, *_ = make_world(folder, tmp_path / "w2", method="lora")
    assert c.job("j").status == "running"


@pytest.mark.parametrize("report_heldout, kept", [(True, 3.25), (False, None)])
def test_reported_losses_survive_a_restart_mid_upload(tiny_model, tmp_path, report_heldout, kept):
    """A held-out loss is kept (and shown per round, from 1) only for a job that asks for it."""
    c, _, clients, _ = make_world(tiny_model, tmp_path, report_heldout=report_heldout)
    client, signer = clients[0]
    envelope = _sealed(c, client, signer, 0, c.blobs.get(c.state.global_adapters("j")[0]))
    session = c.begin_upload(client, UploadHeader("j", 0, 10, len(envelope), hashlib.sha256(envelope).hexdigest(), 1.75, 3.25))
    half = len(envelope) // 2
    c.append_upload(client, session.upload_id, 0, envelope[:half])
    restarted = Coordinator.open(c.layout.root, clock=c.now)
    restarted.append_upload(client, session.upload_id, half, envelope[half:])
    assert restarted.finish_upload(client, session.upload_id) == (0, 1)
    assert [(u.train_loss, u.heldout_loss) for u in restarted.state.updates("j")] == [(1.75, kept)]
    job = read_status(restarted)["jobs"][0]
    assert job["heldout_loss"] == ([{"round": 1, "loss": 3.25, "clients": 1}] if kept else [])
    assert job["updates"][0]["round"] == 1 and job["round"] == 1 and job["rounds_closed"] == 0


def test_a_hostile_heldout_loss_is_refused(world):
    c, _, clients, _ = world
    client, signer = clients[0]
    envelope = _sealed(c, client, signer, 0, c.blobs.get(c.state.global_adapters("j")[0]))
    header = UploadHeader("j", 0, 10, len(envelope), hashlib.sha256(envelope).hexdigest(), None, float("inf"))
    with pytest.raises(InvalidUpdateError, match="heldout_loss must be a finite number"):
        c.submit_update(client, header, envelope)


# Two honest clients move every value by 1 and 2, a third (hostile) by 30; example counts as claimed.
# Krum (f = 0, n = 3): each score is the squared distance to the one closest other proposal: 1, 1 and
# 28^2 per value, so client 1 (tie, lowest index) is kept; multi-Krum keeps the two lowest, 1 and 2.
@pytest.mark.parametrize("job, examples, expected", [
    ({}, (10, 10, 10), (1 + 2 + 30) / 3),                                       # FedAvg
    ({"max_weight_share": 1.0}, (10, 10, 80), (10 * 1 + 10 * 2 + 80 * 30) / 100),  # FedAvg, uncapped
    ({}, (10, 10, 80), (10 * 1 + 10 * 2 + 20 * 30) / 40),   # 80 capped at T = 0.5 * (10 + 10 + T): T = 20
    ({"weighting": "equal"}, (10, 10, 80), (1 + 2 + 30) / 3),
    ({"combine": "median"}, (10, 10, 10**6), 2.0),
    ({"combine": "trimmed_mean", "combine_params": {"trim": 0.34}}, (10, 10, 10), 2.0),
    ({"combine": "krum", "combine_params": {"byzantine": 0}, "min_clients": 3}, (10, 10, 10), 1.0),
    ({"combine": "multi_krum", "combine_params": {"byzantine": 0, "keep": 2}, "min_clients": 3}, (10, 10, 10), 1.5),
])
def test_how_a_round_combines_and_weighs_its_updates(tiny_model, tmp_path, job, examples, expected):
    c, _, clients, _ = make_world(tiny_model, tmp_path, rounds=1, **job)
    for (client, signer), shift, n in zip(clients, (1.0, 2.0, 30.0), examples):
        _upload(c, client, signer, 0, shift=shift, examples=n)
    start, new = (from_bytes(c.blobs.get(d)) for d in c.state.global_adapters("j"))
    for k in start:
        assert torch.allclose(new[k], start[k] + expected, atol=1e-5), k


def test_an_example_count_above_the_jobs_bound_is_refused(tiny_model, tmp_path):
    c, _, clients, _ = make_world(tiny_model, tmp_path, max_examples_per_client=1000)
    with pytest.raises(InvalidUpdateError, match="max_examples_per_client"):
        _upload(c, *clients[0], 0, examples=1001)
    _upload(c, *clients[0], 0, examples=1000)
    assert [u.num_examples for u in c.state.updates("j")] == [1000]


@pytest.mark.parametrize("job, message", [
    ({"combine": "krum"}, "at least 5 updates"),                      # f = 1 needs n > 4; a round may close with 2
    ({"combine": "median", "dp_clip": 1.0}, "neither DP"),
    ({"combine": "median", "secure_aggregation": True}, "nor secure aggregation"),
    ({"combine": "mean", "combine_params": {"trim": 0.1}}, "takes no parameters"),
    ({"combine": "trimmed_mean", "combine_params": {"trim": 0.5}}, "trim"),
    ({"combine": "geometric_median"}, "unknown combiner"),
    ({"weighting": "loss"}, "weighting"),
    ({"max_weight_share": 0.0}, "max_weight_share"),
    ({"max_examples_per_client": 0}, "max_examples_per_client"),
    ({"rounds": 10**6}, "at most"),
    ({"job_id": "j" * 65}, "1 to 64"),
])
def test_bad_aggregation_settings(job, message):
    settings = {"job_id": "j", "base_model": "m", "clients_per_round": 3, "min_clients": 2, **job}
    with pytest.raises(ConfigError, match=message):
        JobConfig(**settings)


def _selected(c, round_):
    return c.state.round("j", round_).selected


def test_rounds_sample_their_clients_and_the_others_wait(tiny_model, tmp_path):
    c, _, clients, _ = make_world(tiny_model, tmp_path, rounds=3, clients_per_round=2, min_clients=None, round_timeout_s=0)
    by_id = {cl.client_id: (cl, k) for cl, k in clients}
    ids = sorted(by_id)
    for round_ in range(3):
        chosen = _selected(c, round_)
        assert len(chosen) == 2 and set(chosen) <= set(ids)
        assert list(chosen) == selection.ranked(0, "j", round_, ids)[:2]  # the seeded order, recorded
        (other,) = set(ids) - set(chosen)
        assert c.task(by_id[other][0], "j").kind == "wait" and c.task(by_id[chosen[0]][0], "j").kind == "train"
        with pytest.raises(PreconditionError, match="not selected"):
            _upload(c, *by_id[other], round_)
        for cid in chosen:
            _upload(c, *by_id[cid], round_)
        assert c.job("j").round == round_ + 1
    assert len({_selected(c, r) for r in range(3)}) > 1  # the selection changes from round to round
    assert [len(c.state.updates("j", r)) for r in range(3)] == [2, 2, 2]


def test_the_selection_survives_a_restart(tiny_model, tmp_path):
    c, _, clients, _ = make_world(tiny_model, tmp_path, clients_per_round=1, min_clients=None, round_timeout_s=0)
    before = _selected(c, 0)
    restarted = Coordinator.open(c.layout.root)  # as after kill -9: only the state folder carries over
    restarted.tick()
    assert _selected(restarted, 0) == before and len(before) == 1
    (chosen,) = before
    waiting = [cl for cl, _ in clients if cl.client_id != chosen]
    assert all(restarted.task(cl, "j").kind == "wait" for cl in waiting)


def test_over_selection_closes_with_the_first_updates_and_tells_the_late_one(tiny_model, tmp_path):
    c, _, clients, _ = make_world(tiny_model, tmp_path, clients_per_round=2, over_select=1.5, min_clients=None,
                                  round_timeout_s=0)
    by_id = {cl.client_id: (cl, k) for cl, k in clients}
    chosen = _selected(c, 0)
    assert len(chosen) == 3  # ceil(2 * 1.5)
    for cid in chosen[:2]:
        _upload(c, *by_id[cid], 0)
    assert c.job("j").round == 1 and len(c.state.updates("j", 0)) == 2
    with pytest.raises(PreconditionError, match="not accepting updates for round 1 "):
        _upload(c, *by_id[chosen[2]], 0)  # it trained for a round that closed without it


def test_a_selected_client_that_goes_quiet_is_replaced(tiny_model, tmp_path):
    import time
    c, _, clients, _ = make_world(tiny_model, tmp_path, clients_per_round=1, min_clients=None, round_timeout_s=0,
                                  heartbeat_s=0.2)
    (quiet,) = _selected(c, 0)
    others = [cl for cl, _ in clients if cl.client_id != quiet]
    time.sleep(0.3)
    for cl in others:  # they keep asking for work; the selected one has not been heard from for 3 heartbeats
        c.authenticate(cl.client_id)
    time.sleep(0.4)
    for cl in others:
        c.authenticate(cl.client_id)
    c.tick()
    chosen = _selected(c, 0)
    assert chosen[0] == quiet and len(chosen) == 2 and chosen[1] in {cl.client_id for cl in others}
    assert c.task(c.state.client(chosen[1]), "j").kind == "train"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_coordinators_on_one_database_close_a_round_once(tiny_model, tmp_path, backend, request, monkeypatch):
    """Two coordinator processes' objects on one state: both aggregate the round at once (a barrier holds
    each after it stored its result), then race to close it. One wins; the other changes nothing."""
    import threading
    from offsite.cloud import round_control as module
    url = request.getfixturevalue("postgres_server").new_database() if backend == "postgresql" else None
    a, _, clients, done = make_world(tiny_model, tmp_path, db_url=url, rounds=2, clients_per_round=3, min_clients=None,
                                     round_timeout_s=0)
    b = Coordinator.open(a.layout.root, on_training_done=done.append)
    for client in clients:
        _upload(a, *client, 0, tick=False)
    both_aggregated = threading.Barrier(2, timeout=60)
    real_hit = module.failpoints.hit
    monkeypatch.setattr(module.failpoints, "hit", lambda name: both_aggregated.wait() if name == "cloud.round.closing"
                        else real_hit(name))
    errors = []

    def tick(c):
        try:
            c.tick()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=tick, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    closes = [c.metrics.rounds_completed.labels("j")._value.get() for c in (a, b)]
    assert sorted(closes) == [0, 1]  # one coordinator closed the round; the other found it closed
    rounds = a.state.rounds("j")
    assert [r.status for r in rounds] == ["closed", "open"] and rounds[1].adapter_sha256 == rounds[0].result_sha256
    assert a.job("j").round == b.job("j").round == 1 and len(a.state.global_adapters("j")) == 2


def test_a_cancelled_job_stops_its_clients_and_never_closes_its_round(world):
    c, clock, clients, done = world
    _upload(c, *clients[0], 0)
    _upload(c, *clients[1], 0)
    c.cancel_job("j")
    assert c.task(clients[2][0], "j").kind == "done" and c.state.job("j").status == "cancelled"
    with pytest.raises(PreconditionError, match="status cancelled"):
        _upload(c, *clients[2], 0)
    clock.t += 3600  # past the deadline with min_clients updates in: a running job's round would close now
    c.tick()
    assert c.state.round("j", 0).status == "open" and c.job("j").round == 0 and done == []
    with pytest.raises(PreconditionError, match="cannot become cancelled: it is cancelled"):
        c.cancel_job("j")


def test_a_job_cancelled_while_its_round_aggregates_does_not_move(world, monkeypatch):
    """The cancel lands between the aggregation and the close: the close's compare-and-set sees it."""
    from offsite.cloud import round_control as module
    c, _, clients, done = world
    for client in clients[:2]:
        _upload(c, *client, 0, tick=False)
    monkeypatch.setattr(module.failpoints, "hit", lambda name: c.cancel_job("j") if name == "cloud.round.closing" else None)
    _upload(c, *clients[2], 0)  # completes the round; the worker aggregates it, then finds the job cancelled
    assert c.state.job("j").status == "cancelled" and c.state.round("j", 0).status == "open"
    assert c.metrics.rounds_completed.labels("j")._value.get() == 0 and done == []


def test_jobs_list_show_and_cancel_from_the_command_line(world, capsys):
    import json
    from types import SimpleNamespace

    from offsite.cli import main
    c, _, clients, _ = world
    for client in clients:
        _upload(c, *client, 0)
    state = str(c.layout.root)

    def run(*args):  # the CLI in this process: what a separate one would print, without its start-up
        code = main(["cloud", "jobs", *args, "--state", state])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    listed = run("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [{"job_id": "j", "status": "running", "round": 2, "rounds": 2, "method": "full",
                                          "base_model": str(c.job("j").config.base_model), "clients_per_round": 3, "seats": 3}]
    shown = run("show", "j")
    assert shown.returncode == 0 and "round 1: 3 selected, 3 updates in; closed: all expected updates are in" in shown.stdout
    assert "round 2: 3 selected, 0 updates in; open" in shown.stdout
    missing = run("show", "nope")
    assert missing.returncode != 0 and "no job 'nope'" in missing.stderr
    cancelled = run("cancel", "j")
    assert cancelled.returncode == 0 and c.state.job("j").status == "cancelled"
    again = run("cancel", "j")
    assert again.returncode != 0 and "cannot become cancelled" in again.stderr


def test_a_lora_round_merges_its_updates_in_batches_to_the_exact_weighted_mean(tiny_model, tmp_path, monkeypatch):
    """Three LoRA updates in batches of two (one peft merge per batch) give the round's weighted mean of the
    adapters each proposes, merged one by one."""
    from offsite.cloud import round_control
    from offsite.emulator import methods
    from offsite.emulator.bundle import load_bundle
    monkeypatch.setattr(round_control, "MERGE_BATCH", 2)
    c, _, clients, _ = make_world(tiny_model, tmp_path, rounds=2, min_clients=3, method="lora")
    art, cfg = c.job("j").artifacts, c.job("j").config
    start = from_bytes(c.blobs.get(c.state.global_adapters("j")[0]))
    updates = []
    for seed, ((client, signer), examples) in enumerate(zip(clients, (10, 30, 20))):
        g = torch.Generator().manual_seed(seed)
        update = {k: 0.05 * torch.randn(shape, generator=g).to(getattr(torch, dtype)) for k, (shape, dtype) in art.update_spec.items()}
        updates.append(update)
        envelope = _sealed(c, client, signer, 0, to_bytes(update))
        c.submit_update(client, UploadHeader("j", 0, examples, len(envelope), hashlib.sha256(envelope).hexdigest(), None), envelope)
    c.tick()
    assert c.job("j").round == 1
    got = from_bytes(c.blobs.get(c.state.global_adapters("j")[1]))
    proposals = [methods.propose(load_bundle(art.bundle_dir)[0], art.plan, cfg.method_config(), start, u) for u in updates]
    for k in start:
        want = sum(p[k].double() * w for p, w in zip(proposals, (10, 30, 20))) / 60  # none above half
        torch.testing.assert_close(got[k].double(), want.to(start[k].dtype).double(), atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(got[k], start[k]) for k in start)
