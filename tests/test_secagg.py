"""Secure aggregation: the unmasked sum equals the plain sum within fixed-point error, with clients
dropping at every stage; below the threshold a run aborts cleanly; one client's masked input tells
nothing about its values; and the protocol refuses what would expose an input."""
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from offsite.errors import AbortedError, AuthError, InvalidRequestError, InvalidUpdateError, PreconditionError
from offsite.secagg import encoding, shamir
from offsite.secagg.protocol import Advert, SecAggClient, SecAggServer, context
from offsite.sealing import raw_public

CTX = context("job", 0)
LENGTH = 1000


def make(n, t):
    signers = {f"c{i:02d}": Ed25519PrivateKey.generate() for i in range(n)}
    clients = {cid: SecAggClient(cid, key, CTX) for cid, key in signers.items()}
    identity = {cid: raw_public(key.public_key()) for cid, key in signers.items()}
    values = {cid: np.random.default_rng(i).normal(0, 3, LENGTH) for i, cid in enumerate(clients)}
    return clients, identity, values, SecAggServer(CTX, t, LENGTH, max_clients=n)


def through_shares(clients, identity, server):
    """Every client advertises and shares its keys; the server closes both stages."""
    for c in clients.values():
        server.add_advert(c.advertise())
    roster = server.close_adverts()
    for cid, c in clients.items():
        server.add_shares(cid, c.share_keys(roster, identity, server.threshold))
    server.close_shares()


def run(n, t, drop_before_shares=(), drop_before_mask=(), drop_before_reveal=()):
    """One run; clients in each drop set vanish right before that stage. Returns (sum, survivors, values)."""
    clients, identity, values, server = make(n, t)
    for cid, c in clients.items():
        server.add_advert(c.advertise())
    roster = server.close_adverts()
    for cid, c in clients.items():
        if cid not in drop_before_shares:
            server.add_shares(cid, c.share_keys(roster, identity, server.threshold))
    u2 = server.close_shares()
    for cid in u2:
        if cid not in drop_before_mask:
            server.add_masked(cid, clients[cid].mask(server.inbox(cid), values[cid], n))
    survivors = server.close_masked()
    for cid in survivors:
        if cid not in drop_before_reveal:
            server.add_reveal(clients[cid].reveal(survivors))
    return server.unmask(), survivors, values


@pytest.mark.parametrize("n, t, drops", [
    (3, 2, {}),
    (5, 3, {"drop_before_shares": ["c01"]}),                  # never shared: simply not in U2
    (5, 3, {"drop_before_mask": ["c00", "c03"]}),              # shared, then vanished: their pair masks are removed
    (5, 3, {"drop_before_reveal": ["c02", "c04"]}),            # masked, then silent: t reveals suffice
    (10, 4, {"drop_before_shares": ["c09"], "drop_before_mask": ["c01", "c02"], "drop_before_reveal": ["c03", "c04"]}),
])
def test_unmasked_sum_equals_the_plain_sum(n, t, drops):
    total, survivors, values = run(n, t, **drops)
    assert survivors == sorted(set(values) - set(drops.get("drop_before_shares", [])) - set(drops.get("drop_before_mask", [])))
    plain = sum(values[c] for c in survivors)
    assert np.abs(total - plain).max() <= len(survivors) * 2.0 ** -(encoding.FRAC_BITS + 1) + 1e-12


@pytest.mark.parametrize("drops", [{"drop_before_shares": ["c00", "c01", "c02"]},
                                   {"drop_before_mask": ["c00", "c01", "c02"]},
                                   {"drop_before_reveal": ["c00", "c01", "c02"]}])
def test_fewer_survivors_than_the_threshold_abort_cleanly(drops):
    with pytest.raises(AbortedError, match="below the threshold 3"):
        run(5, 3, **drops)


def test_a_masked_input_is_unrelated_to_the_input():
    clients, identity, _, server = make(3, 2)
    through_shares(clients, identity, server)
    x = np.linspace(-100, 100, 200_000)  # a strongly structured input
    c = clients["c00"]
    y = c.mask(server.inbox("c00"), x, 3)
    u = y.astype(np.float64) / 2.0 ** 64
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.std() - 12 ** -0.5) < 0.005      # uniform on [0, 1)
    assert abs(np.corrcoef(u, x)[0, 1]) < 0.01                                     # no trace of the input
    counts = np.bincount((y >> np.uint64(60)).astype(np.int64), minlength=16)      # top 4 bits: flat
    assert ((counts - len(y) / 16) ** 2 / (len(y) / 16)).sum() < 50                # chi-square, 15 dof (p ~ 1e-5)


def test_a_forged_roster_entry_is_refused():
    clients, identity, _, server = make(3, 2)
    adverts = [c.advertise() for c in clients.values()]
    forged = Advert("c01", adverts[1].cipher_pk, adverts[0].mask_pk, adverts[1].signature)  # key swapped in
    with pytest.raises(AuthError, match="c01"):
        clients["c00"].share_keys([adverts[0], forged, adverts[2]], identity, 2)


def test_a_client_reveals_for_one_set_of_survivors_only():
    clients, identity, values, server = make(4, 2)
    through_shares(clients, identity, server)
    for cid, c in clients.items():
        c.mask(server.inbox(cid), values[cid], 4)
    c = clients["c00"]
    first = c.reveal(["c00", "c01", "c02", "c03"])
    assert set(first.seed_shares) == {"c00", "c01", "c02", "c03"} and not first.key_shares
    with pytest.raises(InvalidRequestError, match="second"):  # would give c03's mask key and its self-mask seed
        c.reveal(["c00", "c01", "c02"])


def test_server_refuses_out_of_stage_and_malformed_messages():
    clients, identity, values, server = make(3, 2)
    with pytest.raises(PreconditionError, match="stage 1"):
        server.add_masked("c00", np.zeros(LENGTH, dtype=np.uint64))
    for c in clients.values():
        server.add_advert(c.advertise())
    roster = server.close_adverts()
    sealed = clients["c00"].share_keys(roster, identity, server.threshold)
    with pytest.raises(InvalidRequestError, match="every other client"):
        server.add_shares("c00", sealed[:1])
    for cid, c in clients.items():
        server.add_shares(cid, c.share_keys(roster, identity, server.threshold) if cid != "c00" else sealed)
    server.close_shares()
    with pytest.raises(InvalidRequestError, match="uint64"):
        server.add_masked("c00", np.zeros(LENGTH, dtype=np.float64))


def test_encoding_bounds_and_round_trip():
    x = np.array([-1.5, 0.0, 2.0 ** -20, 1234.5678])
    np.testing.assert_allclose(encoding.decode(encoding.encode(x, 10)), x, atol=2.0 ** -(encoding.FRAC_BITS + 1))
    with pytest.raises(InvalidUpdateError, match="bound for 1000 clients"):
        encoding.encode(np.array([encoding.max_abs(1000)]), 1000)
    with pytest.raises(InvalidUpdateError, match="non-finite"):
        encoding.encode(np.array([np.nan]), 3)


def test_shamir_needs_t_shares():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, 5)
    assert shamir.combine(shares[2:], 3) == secret and shamir.combine([shares[0], shares[3], shares[4]], 3) == secret
    assert shamir.combine([shares[1]] + shares[:3], 3) == secret  # a repeated share counts once
    with pytest.raises(InvalidRequestError, match="2 shares"):
        shamir.combine(shares[:2], 3)
    assert shamir.combine([shares[0], shares[1], (shares[2][0], bytes(32))], 3) != secret  # a wrong share gives garbage


def test_altered_shares_do_not_open():
    clients, identity, values, server = make(3, 2)
    for c in clients.values():
        server.add_advert(c.advertise())
    roster = server.close_adverts()
    for cid, c in clients.items():
        sealed = c.share_keys(roster, identity, server.threshold)
        if cid == "c01":
            s = next(s for s in sealed if s.recipient == "c00")
            sealed = [x if x is not s else type(s)(s.sender, s.recipient, s.ciphertext[:-1] + bytes([s.ciphertext[-1] ^ 1]))
                      for x in sealed]
        server.add_shares(cid, sealed)
    server.close_shares()
    with pytest.raises(AuthError, match="from c01"):
        clients["c00"].mask(server.inbox("c00"), values["c00"], 3)
