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

from offsite.cloud.coordinator import Coordinator, UploadHeader
from offsite.cloud.identity import StateLayout, init_state, load_sealing_key
from offsite.cloud.job import JobConfig
from offsite.errors import ConfigError, InvalidUpdateError, PreconditionError
from offsite.sealing import SealContext, raw_public, seal
from offsite.tensors import from_bytes, to_bytes

NAMES = ["c1", "c2", "c3"]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_world(tiny_model, tmp_path, **job):
    layout = StateLayout(tmp_path / "state")
    tokens = init_state(layout.root, NAMES, ["localhost"], 3600)
    clock, done = Clock(), []
    c = Coordinator.open(layout.root, on_training_done=done.append, clock=clock)
    settings = {"rounds": 2, "clients_per_round": 3, "min_clients": 2, "round_timeout_s": 60, **job}
    c.create_job(JobConfig(job_id="j", base_model=str(tiny_model), emulator_layers=1, **settings))
    clients = []
    for name in NAMES:
        signer = Ed25519PrivateKey.generate()
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        e = c.enroll(Path(tokens[name]).read_text().strip(), raw_public(signer.public_key()), csr)
        clients.append((c.authenticate(e.client_id), signer))
    return c, clock, clients, done


@pytest.fixture
def world(tiny_model, tmp_path):
    return make_world(tiny_model, tmp_path)


def _sealed(c, client, signer, round_, payload: bytes) -> bytes:
    """`payload` sealed as `client`'s update for `round_` of job j."""
    _, _, art = c.job("j")
    return seal(payload, SealContext("j", round_, client.client_id, art["skeleton_digest"]),
                load_sealing_key(c.layout).public_key(), signer)


def _upload(c, client, signer, round_, shift=0.0, train_loss=None, examples=10):
    _, _, art = c.job("j")
    adapter = c.blobs.get(art["adapters"][0])
    if shift:
        adapter = to_bytes({k: v + shift for k, v in from_bytes(adapter).items()})
    envelope = _sealed(c, client, signer, round_, adapter)
    header = UploadHeader("j", round_, examples, len(envelope), hashlib.sha256(envelope).hexdigest(), train_loss)
    return c.submit_update(client, header, envelope)


def test_round_closes_at_its_deadline_with_min_clients_and_late_update_is_refused(world):
    c, clock, clients, _ = world
    _upload(c, *clients[0], 0)
    clock.t += 30
    _upload(c, *clients[1], 0)
    clock.t += 29  # 59 s after the first update: not yet
    c.tick()
    assert c.job("j")[0].round == 0
    clock.t += 2
    c.tick()
    rec, _, art = c.job("j")
    assert rec.round == 1 and len(art["adapters"]) == 2  # closed with 2 of 3, aggregated
    with pytest.raises(PreconditionError, match="round 0"):
        _upload(c, *clients[2], 0)  # the client that was too slow
    assert [u.client_id for u in c.state.updates("j", 0)] == [clients[0][0].client_id, clients[1][0].client_id]


def test_deadline_without_min_clients_keeps_waiting(world):
    c, clock, clients, _ = world
    _upload(c, *clients[0], 0)
    clock.t += 3600
    c.tick()
    assert c.job("j")[0].round == 0  # 1 < min_clients: the round waits
    _upload(c, *clients[1], 0)  # the second update arrives after the deadline: the round closes at once
    assert c.job("j")[0].round == 1


def test_a_dead_client_never_blocks_the_job(world):
    c, clock, clients, done = world
    for round_ in range(2):
        _upload(c, *clients[0], round_)
        _upload(c, *clients[1], round_)  # clients[2] never returns
        clock.t += 61
        c.tick()
    assert done == ["j"] and c.job("j")[0].status == "finalizing"


def test_a_late_arrival_is_also_caught_without_a_tick(world):
    c, clock, clients, _ = world
    _upload(c, *clients[0], 0)
    _upload(c, *clients[1], 0)
    clock.t += 120  # no tick ran: the next call notices the deadline itself
    with pytest.raises(PreconditionError):
        _upload(c, *clients[2], 0)
    assert c.job("j")[0].round == 1


def test_full_round_still_closes_at_once(world):
    c, _, clients, _ = world
    for client in clients:
        _upload(c, *client, 0)
    assert c.job("j")[0].round == 1 and len(from_bytes(c.blobs.get(c.job("j")[2]["adapters"][1]))) > 0


@pytest.mark.parametrize("kwargs", [{"min_clients": 0}, {"min_clients": 4}, {"round_timeout_s": -1}])
def test_bad_round_settings(kwargs):
    with pytest.raises(ConfigError):
        JobConfig(job_id="j", base_model="m", clients_per_round=3, **kwargs)


def test_norm_bound_rejects_a_far_update_with_its_reason(tiny_model, tmp_path):
    c, _, clients, _ = make_world(tiny_model, tmp_path, max_update_norm=1.0)
    _, _, art = c.job("j")
    n = sum(v.numel() for v in from_bytes(c.blobs.get(art["adapters"][0])).values())
    _upload(c, *clients[0], 0, shift=0.5 / n ** 0.5)  # L2 norm 0.5: inside the bound
    with pytest.raises(InvalidUpdateError, match="L2 norm 2, above the job.s bound 1"):
        _upload(c, *clients[1], 0, shift=2.0 / n ** 0.5)
    assert [u.client_id for u in c.state.updates("j")] == [clients[0][0].client_id]
    assert "above the job's bound" in c.state.rejections("j")[0][2]


def test_fedavgm_keeps_momentum_between_rounds(tiny_model, tmp_path):
    c, _, clients, _ = make_world(tiny_model, tmp_path, clients_per_round=1, min_clients=None, round_timeout_s=0,
                                  aggregator="fedavgm", aggregator_params={"server_lr": 1.0, "momentum": 0.5})
    _, _, art = c.job("j")
    start = from_bytes(c.blobs.get(art["adapters"][0]))
    for round_ in range(2):
        _upload(c, *clients[0], round_, shift=1.0)  # each round the client sends the original adapter + 1
    _, _, art = c.job("j")
    name = next(iter(start))
    after1, after2 = (from_bytes(c.blobs.get(d))[name] for d in art["adapters"][1:3])
    assert torch.allclose(after1, start[name] + 1.0)  # v = 1; global + 1
    assert torch.allclose(after2, start[name] + 1.5)  # delta = (start + 1) - (start + 1) = 0; v = 0.5; global + 0.5
    assert art["strategy_state"] is not None


def test_a_method_the_model_cannot_run_is_refused_when_the_job_is_made(tiny_model, tmp_path):
    """peft's prefix tuning fails on Falcon's fused multi-query attention: the job is refused, naming both."""
    import shutil
    from tests.test_families import tiny
    folder = tmp_path / "falcon"
    tiny("falcon").save_pretrained(str(folder))
    for f in tiny_model.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    with pytest.raises(ConfigError, match="prefix does not run on model type 'falcon'"):
        make_world(folder, tmp_path / "w", method="prefix")


def test_a_reported_train_loss_survives_a_restart_mid_upload(world):
    c, _, clients, _ = world
    client, signer = clients[0]
    _, _, art = c.job("j")
    envelope = _sealed(c, client, signer, 0, c.blobs.get(art["adapters"][0]))
    session = c.begin_upload(client, UploadHeader("j", 0, 10, len(envelope), hashlib.sha256(envelope).hexdigest(), 1.75))
    half = len(envelope) // 2
    c.append_upload(client, session.upload_id, 0, envelope[:half])
    restarted = Coordinator.open(c.layout.root, clock=c._now)
    restarted.append_upload(client, session.upload_id, half, envelope[half:])
    assert restarted.finish_upload(client, session.upload_id) == (0, 1)
    assert [u.train_loss for u in restarted.state.updates("j")] == [1.75]


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
    _, _, art = c.job("j")
    start, new = from_bytes(c.blobs.get(art["adapters"][0])), from_bytes(c.blobs.get(art["adapters"][1]))
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
