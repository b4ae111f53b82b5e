"""The client's side of a round's secure aggregation (offsite.secagg): its weighted change to the global
adapter goes to the coordinator masked, so the coordinator learns only the sum over clients.

The change is the dense one the update proposes (LoRA and IA3 merged, as the coordinator would), over
the tensors the method can change; it is clipped here when the job says so, because the coordinator
can no longer check single updates. A client that comes too late for the run, or whose run aborts,
is left out of the round (SecAggLost) and keeps its trained update for the next try."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
import torch

from offsite import failpoints
from offsite.client.retry import TRANSIENT, with_retry
from offsite.client.transfer import upload
from offsite.emulator import methods
from offsite.emulator.bundle import load_bundle
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.secagg import vector
from offsite.secagg.protocol import Advert, SealedShares, SecAggClient, context
from offsite.sealing import SealContext, seal
from offsite.tensors import to_bytes

log = logging.getLogger("offsite.client")
Stage = pb.SecAggState


class SecAggLost(Exception):
    """This client is not part of the round's run (too late, or the run aborted)."""


def masked_input(bundle_dir: Path, start: dict[str, torch.Tensor], update: dict[str, torch.Tensor],
                 method: methods.MethodConfig, privacy: pb.Privacy, num_examples: int):
    """The float64 vector this client masks, and its change's norm before clipping."""
    scratch, _, plan = load_bundle(bundle_dir)
    proposal = methods.propose(scratch, plan, method, start, update)
    change = {k: proposal[k].double() - start[k].double() for k in methods.touched(method, update)}
    return vector.client_input(change, 1.0 if privacy.equal_weights else float(num_examples), privacy.clip)


def secure_submit(stub, task, me, make_input, retry_s: float) -> tuple[str, int]:
    """Run the protocol for the input `make_input()` gives (with its norm before clipping), made once
    this client is in the run; returns what happened and the bytes of the masked upload."""
    agent = SecAggClient(me.client_id, me.signing_key, context(task.job_id, task.round))

    def call(**message) -> pb.SecAggState:
        request = pb.SecAggRequest(job_id=task.job_id, round=task.round, **message)
        try:  # ABORTED here is the run's end, not a hiccup to retry
            return with_retry(lambda: stub.SecAgg(request), "secure aggregation", retry_s,
                              transient=TRANSIENT - {grpc.StatusCode.ABORTED})
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED):
                raise SecAggLost(e.details()) from None
            raise

    def past(stage: int, state: pb.SecAggState) -> pb.SecAggState:
        while state.stage == stage:
            time.sleep(state.retry_after_s or 0.5)
            state = call()
        return state

    a = agent.advertise()
    state = past(Stage.ADVERTISE, call(advert=pb.SecAggAdvert(cipher_public_key=a.cipher_pk, mask_public_key=a.mask_pk,
                                                              signature=a.signature)))
    roster = [Advert(e.client_id, e.cipher_public_key, e.mask_public_key, e.signature) for e in state.roster]
    sealed = agent.share_keys(roster, {e.client_id: e.identity_public_key for e in state.roster}, state.threshold)
    state = past(Stage.SHARE_KEYS, call(shares=pb.SecAggShares(sealed=[
        pb.SealedShares(sender=s.sender, recipient=s.recipient, ciphertext=s.ciphertext) for s in sealed])))
    failpoints.hit("client.secagg.shared")  # tests: a client that dies after sharing its keys
    x, norm = make_input()
    y = agent.mask([SealedShares(s.sender, s.recipient, s.ciphertext) for s in state.inbox], x, state.max_clients)
    ctx = SealContext(task.job_id, task.round, me.client_id, task.skeleton_digest)
    envelope = seal(to_bytes({vector.MASKED: torch.from_numpy(y)}), ctx, me.coordinator_key, me.signing_key)
    with_retry(lambda: upload(stub, task.job_id, task.round, 1, envelope), "masked upload", retry_s)
    try:
        state = past(Stage.MASK, call())
        r = agent.reveal(list(state.survivors))
        call(reveal=pb.SecAggReveal(seed_shares={k: pb.ShamirShare(index=i, value=v) for k, (i, v) in r.seed_shares.items()},
                                    key_shares={k: pb.ShamirShare(index=i, value=v) for k, (i, v) in r.key_shares.items()}))
    except SecAggLost as e:  # the sum may already hold this input: enough others revealed in time
        return f"masked input sent (change norm {norm:.4g}); the run went on without this client's reveal: {e}", len(envelope)
    return f"masked input of {len(y)} values in a sum of {len(state.survivors)} (change norm {norm:.4g})", len(envelope)
