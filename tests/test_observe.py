"""Monitoring: Prometheus counters at the points the coordinator accepts, refuses and aggregates updates;
the read-only status page, /api/status, /metrics and /healthz over real HTTP (checked in a headless
Chromium screenshot where one is installed); JSON log lines."""
import hashlib
import io
import json
import logging
import shutil
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from offsite.cloud.intake import UploadHeader
from offsite.cloud.status import read_status
from offsite.cloud.status_page import PLOT_COLOUR
from offsite.cloud.web import start_web
from offsite.errors import AlreadyExistsError, InvalidUpdateError, PreconditionError
from offsite.logs import log_handler
from offsite.tensors import from_bytes, to_bytes
from tests.procs import offsite
from tests.test_rounds import _sealed, _upload, make_world

EVIL = "<script>alert(1)</script>"
EVAL = {"all": {"full_zero_shot": 6.9, "emulator_zero_shot": 6.95, "emulator_with_adapter": 2.56, "plug_in": 2.5591}}


def _upload_in_parts(c, client, signer, num_examples: int, train_loss: float, between=lambda: None):
    """An update through begin/append/finish, as the servicer drives it, in two parts; `between` runs
    while the upload is open."""
    envelope = _sealed(c, client, signer, 0, c.blobs.get(c.state.global_adapters("j")[0]))
    header = UploadHeader("j", 0, num_examples, len(envelope), hashlib.sha256(envelope).hexdigest(), train_loss)
    session = c.begin_upload(client, header)
    half = len(envelope) // 2
    c.append_upload(client, session.upload_id, 0, envelope[:half])
    between()
    c.append_upload(client, session.upload_id, half, envelope[half:])
    assert c.finish_upload(client, session.upload_id) == (0, 1)
    return len(envelope)


def _get(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, from Prometheus text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def observed(tiny_model, tmp_path_factory):
    """A 2-round job driven through accepted and refused updates (one refused for a tensor named like a
    script tag), a download and both rounds closing; then finished with a report and a revoked client.
    The status server runs throughout."""
    c, _, clients, _ = make_world(tiny_model, tmp_path_factory.mktemp("observe"))
    web = start_web(c, "127.0.0.1:0")
    url = f"http://127.0.0.1:{web.port}"
    (c1, s1), (c2, s2), (c3, s3) = clients
    adapter = c.blobs.get(c.state.global_adapters("j")[0])
    sent = sum(len(data) for _, data in c.download(c1, c.job("j").artifacts.manifest, 0))
    mid = {}
    received = _upload_in_parts(c, c1, s1, 30, 2.0, between=lambda: mid.update(_samples(_get(url + "/metrics")[2].decode())))
    with pytest.raises(InvalidUpdateError, match="signature"):
        _upload(c, c2, Ed25519PrivateKey.generate(), 0)
    evil = to_bytes({**from_bytes(adapter), EVIL: torch.zeros(1)})
    envelope = _sealed(c, c2, s2, 0, evil)
    with pytest.raises(InvalidUpdateError, match="tensor names differ"):
        c.submit_update(c2, UploadHeader("j", 0, 10, len(envelope), hashlib.sha256(envelope).hexdigest()), envelope)
    with pytest.raises(PreconditionError):
        _upload(c, c3, s3, 1)  # round 1 is not open yet
    with pytest.raises(AlreadyExistsError):
        _upload(c, c1, s1, 0)
    _upload(c, c2, s2, 0, train_loss=4.0)
    _upload(c, c3, s3, 0)  # no loss reported; the third update closes round 0
    for (client, signer), loss in zip(clients, (1.5, 2.5, 2.0)):
        _upload(c, client, signer, 1, train_loss=loss)
    job_dir = c.layout.jobs / "j"
    (job_dir / "report.json").write_text(json.dumps({"eval": EVAL}))
    c.state.set_job_status("j", "done")
    c.state.revoke_client(c3.client_id)
    yield SimpleNamespace(c=c, url=url, mid=mid, sent=sent, received=received, clients=clients)
    web.stop()


def test_metrics_count_what_the_coordinator_did(observed):
    status, headers, body = _get(observed.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    m, j = _samples(body.decode()), (("job", "j"),)
    assert m[("offsite_updates_accepted_total", j)] == 6
    rejected = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "offsite_updates_rejected_total"}
    assert rejected == {"bad_seal": 1, "bad_tensors": 1, "round_not_open": 1, "duplicate": 1}
    assert m[("offsite_rounds_completed_total", j)] == 2
    assert m[("offsite_aggregation_seconds_count", ())] == 2
    assert m[("offsite_received_bytes_total", ())] == observed.received > 0  # submit_update alone carries no traffic
    assert m[("offsite_sent_bytes_total", ())] == observed.sent > 0
    assert m[("offsite_job_round", j)] == 2 and m[("offsite_uploads_in_progress", j)] == 0
    assert m[("offsite_job_status", (("job", "j"), ("status", "done")))] == 1
    assert m[("offsite_job_status", (("job", "j"), ("status", "running")))] == 0
    assert ("offsite_round_selected", j) not in m  # a finished job has no open round
    assert m[("offsite_clients_connected", ())] == 2  # the third is revoked
    mid = observed.mid  # scraped while the first upload was half in
    assert mid[("offsite_uploads_in_progress", j)] == 1 and mid[("offsite_job_round", j)] == 0
    assert mid[("offsite_round_selected", j)] == 3 and mid[("offsite_round_updates", j)] == 0
    assert mid[("offsite_job_status", (("job", "j"), ("status", "running")))] == 1
    assert mid.get(("offsite_updates_accepted_total", j), 0) == 0 and mid[("offsite_clients_connected", ())] == 3


def test_rejection_categories_are_a_fixed_set(observed):
    with pytest.raises(ValueError, match="unknown rejection reason"):
        observed.c.metrics.rejected("j", "tensor <script> has shape [3]")


def test_status_page_api_and_health_over_http(observed):
    c, url = observed.c, observed.url
    status, headers, body = _get(url + "/api/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    api = json.loads(body)
    assert api == json.loads(json.dumps(read_status(c)))  # one source for `cloud status --json` and this
    job = api["jobs"][0]
    assert job["train_loss"] == [{"round": 1, "loss": 2.5, "clients": 2}, {"round": 2, "loss": 2.0, "clients": 3}]  # (30*2+10*4)/40
    assert job["heldout_loss"] == [] and job["round"] == job["rounds"] == job["rounds_closed"] == 2  # rounds from 1
    assert job["eval"] == EVAL and job["status"] == "done"
    assert sum(EVIL in r["reason"] for r in job["rejected"]) == 1

    status, headers, page = _get(url + "/")
    html = page.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<svg" in html and f'stroke="{PLOT_COLOUR}"' in html and html.count("<circle") == 2
    assert "Reported by the clients" in html and "2.5591" in html and "revoked" in html
    assert all(name in html for name in ("c1", "c2", "c3")) and "2 of 2" in html
    assert [(r["round"], r["status"], len(r["selected"]), r["updates"]) for r in job["round_log"]] == [
        (1, "closed", 3, 3), (2, "closed", 3, 3)]
    assert "<h3>Rounds</h3>" in html and "all expected updates are in" in html and "3 (3)" in html

    status, _, body = _get(url + "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert _get(url + "/nope")[0] == 404
    status, headers, _ = _get(url + "/", method="POST")
    assert status == 405 and headers["Allow"] == "GET"
    assert _get(url + "/metrics", method="DELETE")[0] == 405


def _read_png(data: bytes) -> np.ndarray:
    """Pixels (height, width, channels) of an 8-bit, non-interlaced RGB or RGBA PNG: enough for a browser
    screenshot, without an imaging library in the dependencies for one test."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    out, prior = np.zeros((height, stride), np.uint8), np.zeros(stride, np.int64)
    for y in range(height):
        kind, row = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if kind == 1:
            row = row.reshape(width, bpp).cumsum(0).reshape(-1) % 256
        elif kind == 2:
            row = (row + prior) % 256
        elif kind in (3, 4):  # each byte depends on the one to its left: decode byte by byte
            r, up = row.tolist(), prior.tolist()
            for i in range(stride):
                left, corner = (r[i - bpp], up[i - bpp]) if i >= bpp else (0, 0)
                if kind == 3:
                    r[i] = (r[i] + (left + up[i]) // 2) % 256
                else:
                    p = left + up[i] - corner
                    pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - corner)
                    r[i] = (r[i] + (left if pa <= pb and pa <= pc else up[i] if pb <= pc else corner)) % 256
            row = np.array(r, np.int64)
        out[y], prior = row, row
    return out.reshape(height, width, bpp)


def test_status_page_renders_in_a_real_browser(observed, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium): the screenshot check needs a real browser")
    shot = tmp_path / "page.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--force-device-scale-factor=1", "--window-size=1200,900",
                    f"--screenshot={shot}", observed.url + "/"], capture_output=True, timeout=120, check=True)
    pixels = _read_png(shot.read_bytes())[..., :3]
    assert pixels.shape == (900, 1200, 3)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, tables and the plot, not a blank or error page
    red = tuple(int(PLOT_COLOUR[i:i + 2], 16) for i in (1, 3, 5))
    assert (pixels == red).all(-1).sum() > 300  # the loss line and its markers are on screen


def test_json_log_lines():
    stream, logger = io.StringIO(), logging.getLogger("offsite.test.json")
    logger.addHandler(log_handler("json", stream))
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info("round %d closed\nwith %s", 2, "fedavg")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("finalization failed")
    logger.debug("not shown")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["level"], r["logger"], r["msg"]) for r in lines] == [
        ("INFO", "offsite.test.json", "round 2 closed\nwith fedavg"), ("ERROR", "offsite.test.json", "finalization failed")]
    assert "exc" not in lines[0] and "RuntimeError: boom" in lines[1]["exc"]
    assert lines[0]["ts"].endswith("+00:00") and lines[0]["ts"][:2] == "20"
    plain = io.StringIO()
    logger.handlers = [log_handler("text", plain)]
    logger.info("hello")
    assert plain.getvalue().rstrip().endswith("offsite.test.json INFO hello")


def test_extreme_client_numbers_never_break_the_operators_views(tiny_model, tmp_path):
    """The largest loss and example count the wire and the job allow, and rows an older coordinator took in
    before any bound (a loss of 1e17 with 2^62 examples, which made the page answer 500 and the JSON hold
    Infinity): the page renders, /api/status and `cloud status --json` are strict JSON, losses are clamped."""
    from offsite.cloud.state import UpdateRecord
    from offsite.cloud.status import LOSS_SHOWN_MAX
    c, _, clients, _ = make_world(tiny_model, tmp_path)
    _upload(c, *clients[0], 0, train_loss=1e6, examples=10**8)
    c.state.add_update(UpdateRecord("j", 0, clients[1][0].client_id, 2**62, "0" * 64, 1, 0.0, 1e17))
    c.state._run("INSERT INTO updates (job_id, round, client_id, num_examples, blob_sha256, upload_bytes, accepted_at, "
                 "train_loss) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # as an older coordinator wrote it: any round
                 ("j", 1, clients[2][0].client_id, 2**62, "0" * 64, 1, 0.0, 1e300))

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"not JSON: {name}"))

    web = start_web(c, "127.0.0.1:0")
    try:
        status, _, page = _get(f"http://127.0.0.1:{web.port}/")
        assert status == 200 and PLOT_COLOUR in page.decode()
        status, _, body = _get(f"http://127.0.0.1:{web.port}/api/status")
        assert status == 200
        losses = [p["loss"] for p in strict(body)["jobs"][0]["train_loss"]]
        assert losses == [LOSS_SHOWN_MAX, LOSS_SHOWN_MAX]
    finally:
        web.stop()
    out = subprocess.run(offsite("cloud", "status", "--state", str(c.layout.root), "--json"), check=True,
                         capture_output=True, text=True).stdout
    assert strict(out)["jobs"][0]["train_loss"] == strict(body)["jobs"][0]["train_loss"]
