"""Secure aggregation through the coordinator (plain objects, no network): the round's new adapter is
the FedAvg of the clients' changes within fixed-point error, a client that vanishes after sharing keys
does not stop the round, too few clients close the round without an update, and a restart mid-run
does not leave the round stuck."""
import hashlib

import pytest
import torch

from offsite.cloud.coordinator import Coordinator
from offsite.cloud.intake import UploadHeader
from offsite.cloud.identity import load_sealing_key
from offsite.errors import ConfigError, PreconditionError
from offsite.cloud.job import JobConfig
from offsite.secagg import encoding, vector
from offsite.secagg.protocol import SecAggClient, context
from offsite.sealing import SealContext, seal
from offsite.tensors import from_bytes, to_bytes
from tests.test_rounds import make_world

WEIGHTS = {"c1": 10, "c2": 30, "c3": 20}


def _send_masked(c, client, signer, y):
    digest = c.job("j").artifacts.skeleton_digest
    envelope = seal(to_bytes({vector.MASKED: torch.from_numpy(y)}), SealContext("j", 0, client.client_id, digest),
                    load_sealing_key(c.layout).public_key(), signer)
    c.submit_update(client, UploadHeader("j", 0, 1, len(envelope), hashlib.sha256(envelope).hexdigest()), envelope)


def _change(c, shift):
    shapes = c.job("j").artifacts.secagg_shapes
    start = from_bytes(c.blobs.get(c.state.global_adapters("j")[0]))
    return start, {k: torch.full(s, shift, dtype=torch.float64) for k, s in shapes.items()}


def secure_round(c, clock, clients, shifts, vanish_after_shares=()):
    """Drive every client through the protocol; those in `vanish_after_shares` never send a masked input."""
    names = {cl.client_id: next(r.name for r in c.state.clients() if r.client_id == cl.client_id) for cl, _ in clients}
    agents = {cl.client_id: SecAggClient(cl.client_id, signer, context("j", 0)) for cl, signer in clients}
    for cl, _ in clients:
        a = agents[cl.client_id].advertise()
        c.secagg(cl, "j", 0, advert=(a.cipher_pk, a.mask_pk, a.signature))
    view = c.secagg(clients[0][0], "j", 0)
    assert view["stage"] == 2 and view["threshold"] == 2
    roster, identity = [a for a, _ in view["roster"]], {a.client_id: key for a, key in view["roster"]}
    for cl, _ in clients:
        c.secagg(cl, "j", 0, shares=agents[cl.client_id].share_keys(roster, identity, view["threshold"]))
    for cl, signer in clients:
        if names[cl.client_id] in vanish_after_shares:
            continue
        view = c.secagg(cl, "j", 0)
        assert view["stage"] == 3
        x, _ = vector.client_input(_change(c, shifts[names[cl.client_id]])[1], WEIGHTS[names[cl.client_id]])
        _send_masked(c, cl, signer, agents[cl.client_id].mask(view["inbox"], x, view["max_clients"]))
    if vanish_after_shares:
        clock.t += 31  # the mask stage's deadline
        c.tick()
    for cl, _ in clients:
        if names[cl.client_id] not in vanish_after_shares and c.job("j").round == 0:
            view = c.secagg(cl, "j", 0)
            c.secagg(cl, "j", 0, reveal=agents[cl.client_id].reveal(view["survivors"]))
    c.tick()  # the round worker closes the round from the run's sum


@pytest.mark.parametrize("vanish", [(), ("c2",)])
def test_secure_round_gives_the_fedavg_of_the_changes(tiny_model, tmp_path, vanish):
    c, clock, clients, _ = make_world(tiny_model, tmp_path, rounds=2, secure_aggregation=True)
    shifts = {"c1": 0.01, "c2": -0.02, "c3": 0.005}
    start, _ = _change(c, 0)
    secure_round(c, clock, clients, shifts, vanish)
    assert c.job("j").round == 1
    new = from_bytes(c.blobs.get(c.state.global_adapters("j")[1]))
    kept = [n for n in shifts if n not in vanish]
    expected = sum(WEIGHTS[n] * shifts[n] for n in kept) / sum(WEIGHTS[n] for n in kept)
    for k, v in new.items():  # fixed point: each weighted value rounds by at most half a step
        torch.testing.assert_close(v.double() - start[k].double(), torch.full(v.shape, expected, dtype=torch.float64),
                                   atol=2.0 ** -encoding.FRAC_BITS + 1e-7, rtol=0)


def test_too_few_clients_close_the_round_without_an_update(tiny_model, tmp_path):
    c, clock, clients, _ = make_world(tiny_model, tmp_path, rounds=2, secure_aggregation=True)
    start, _ = _change(c, 0)
    secure_round(c, clock, clients, {"c1": 0.1, "c2": 0.1, "c3": 0.1}, vanish_after_shares=("c1", "c2"))
    # one masked input of three at the mask deadline: aborted there
    assert c.job("j").round == 1 and from_bytes(c.blobs.get(c.state.global_adapters("j")[1])).keys() == start.keys()
    assert all(torch.equal(v, start[k]) for k, v in from_bytes(c.blobs.get(c.state.global_adapters("j")[1])).items())
    assert any("secure aggregation" in why and "below the threshold" in why for _, _, why in c.state.rejections("j"))


@pytest.mark.parametrize("over_select, refusal", [(1.0, "not selected"), (1.5, "stage 2, not 1")])
def test_a_late_or_unselected_client_is_not_part_of_the_run(tiny_model, tmp_path, over_select, refusal):
    """The run's roster is the round's selection: of 3 clients, 2 seats leave one out; with 3 seats the
    third is selected but late, after 2 adverts closed the advert stage."""
    c, clock, clients, _ = make_world(tiny_model, tmp_path, rounds=1, secure_aggregation=True, clients_per_round=2,
                                      over_select=over_select)
    agents = {cl.client_id: SecAggClient(cl.client_id, s, context("j", 0)) for cl, s in clients}
    selected = c.state.round("j", 0).selected
    first = [cl for cl, _ in clients if cl.client_id in selected[:2]]
    for cl in first:
        a = agents[cl.client_id].advertise()
        c.secagg(cl, "j", 0, advert=(a.cipher_pk, a.mask_pk, a.signature))
    (late,) = [cl for cl, _ in clients if cl not in first]
    a = agents[late.client_id].advertise()
    with pytest.raises(PreconditionError, match=refusal):
        c.secagg(late, "j", 0, advert=(a.cipher_pk, a.mask_pk, a.signature))


def test_a_restart_mid_run_closes_the_round_instead_of_hanging(tiny_model, tmp_path):
    """The run lives in memory; masked inputs accepted before a restart cannot be unmasked after it."""
    c, clock, clients, _ = make_world(tiny_model, tmp_path, rounds=2, secure_aggregation=True)
    agents = {cl.client_id: SecAggClient(cl.client_id, s, context("j", 0)) for cl, s in clients}
    for cl, _ in clients:
        a = agents[cl.client_id].advertise()
        c.secagg(cl, "j", 0, advert=(a.cipher_pk, a.mask_pk, a.signature))
    view = c.secagg(clients[0][0], "j", 0)
    roster, identity = [a for a, _ in view["roster"]], {a.client_id: key for a, key in view["roster"]}
    for cl, _ in clients:
        c.secagg(cl, "j", 0, shares=agents[cl.client_id].share_keys(roster, identity, 2))
    cl, signer = clients[0]
    x, _ = vector.client_input(_change(c, 0.1)[1], 1.0)
    _send_masked(c, cl, signer, agents[cl.client_id].mask(c.secagg(cl, "j", 0)["inbox"], x, 3))
    restarted = Coordinator.open(c.layout.root, clock=clock)
    restarted.tick()
    assert restarted.job("j").round == 1
    assert any("restarted" in why for _, _, why in restarted.state.rejections("j"))


def test_secure_aggregation_settings_are_checked():
    with pytest.raises(ConfigError, match="secure aggregation"):
        JobConfig(job_id="j", base_model="x", secure_aggregation=True, clients_per_round=1)
    with pytest.raises(ConfigError, match="secure aggregation"):
        JobConfig(job_id="j", base_model="x", secure_aggregation=True, clients_per_round=3, secagg_threshold=4)
