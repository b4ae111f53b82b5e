"""What secure aggregation adds to a round, by client count, against plain aggregation of the same
updates. One process, the protocol's own objects, the demo adapter's size; the wire is left out, so
bytes are counted and compute is timed.

    .venv/bin/python bench/secagg.py [--clients 3,10,30] [--values 3164161] [--drop 0.1]

For each n: plain = the coordinator's streamed weighted float64 sum of n fp32 updates; secure = the
coordinator's side of a run (relaying, summing n masked inputs, rebuilding secrets, removing masks,
with `--drop` of the clients vanishing after sharing keys) and one client's side (keys, shares, masks).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from offsite.cloud.aggregate import WeightedMean
from offsite.files import write_json
from offsite.secagg.protocol import SecAggClient, SecAggServer, context
from offsite.sealing import raw_public

ROOT = Path(__file__).resolve().parents[1]


def plain_seconds(n: int, values: int) -> float:
    update = {"w": torch.randn(values)}
    mean, started = WeightedMean(), time.perf_counter()
    for _ in range(n):
        mean.add(update, 100.0)
    mean.result()
    return time.perf_counter() - started


def secure_run(n: int, values: int, drop: float) -> dict:
    ctx, x = context("bench", 0), np.random.default_rng(0).normal(0, 0.01, values)
    keys = {f"c{i:03d}": Ed25519PrivateKey.generate() for i in range(n)}
    identity = {c: raw_public(k.public_key()) for c, k in keys.items()}
    clients = {c: SecAggClient(c, k, ctx) for c, k in keys.items()}
    server, server_s, client_s = SecAggServer(ctx, n // 2 + 1, values, max_clients=n), 0.0, {c: 0.0 for c in clients}

    def timed(who, fn, *args):
        nonlocal server_s
        started = time.perf_counter()
        out = fn(*args)
        if who is None:
            server_s += time.perf_counter() - started
        else:
            client_s[who] += time.perf_counter() - started
        return out

    for c, agent in clients.items():
        timed(None, server.add_advert, timed(c, agent.advertise))
    roster = timed(None, server.close_adverts)
    for c, agent in clients.items():
        timed(None, server.add_shares, c, timed(c, agent.share_keys, roster, identity, server.threshold))
    timed(None, server.close_shares)
    dropped = set(sorted(clients)[:int(n * drop)])
    masked_bytes = 0
    for c, agent in clients.items():
        if c not in dropped:
            y = timed(c, agent.mask, timed(None, server.inbox, c), x, n)
            masked_bytes = y.nbytes
            timed(None, server.add_masked, c, y)
    survivors = timed(None, server.close_masked)
    for c in survivors:
        timed(None, server.add_reveal, timed(c, clients[c].reveal, survivors))
    total = timed(None, server.unmask)
    assert np.allclose(total, x * len(survivors), atol=1e-5)
    active = [client_s[c] for c in survivors]
    return {"server_seconds": server_s, "client_seconds": sum(active) / len(active), "dropped": len(dropped),
            "masked_bytes": masked_bytes, "fp32_bytes": 4 * values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="3,10,30")
    parser.add_argument("--values", type=int, default=3_164_161, help="the demo adapter's values, and the weight")
    parser.add_argument("--drop", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    print(f"{args.values:,} values per update; {args.drop:.0%} of clients drop after sharing keys")
    print(f"{'n':>4}{'plain s':>10}{'secure server s':>17}{'ratio':>8}{'client s':>10}{'upload x fp32':>15}")
    for n in map(int, args.clients.split(",")):
        plain = plain_seconds(n, args.values)
        secure = secure_run(n, args.values, args.drop)
        rows[n] = {"plain_server_seconds": round(plain, 3), **{k: round(v, 3) if isinstance(v, float) else v for k, v in secure.items()},
                   "server_ratio": round(secure["server_seconds"] / plain, 1),
                   "upload_ratio": round(secure["masked_bytes"] / secure["fp32_bytes"], 2)}
        r = rows[n]
        print(f"{n:>4}{r['plain_server_seconds']:>10.3f}{r['server_seconds']:>17.3f}{r['server_ratio']:>8.1f}"
              f"{r['client_seconds']:>10.3f}{r['upload_ratio']:>15.2f}", flush=True)
    write_json(ROOT / "bench" / "results" / "secagg.json", {"values": args.values, "drop": args.drop, "clients": rows})


if __name__ == "__main__":
    sys.exit(main())
