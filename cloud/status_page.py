"""The status page as one self-contained HTML document rendered from `offsite.cloud.status.read_status`:
tables, and the loss plot as inline SVG drawn here. No JavaScript and nothing fetched from elsewhere;
every value that came from a client or the state is HTML-escaped."""
from __future__ import annotations

import math
import time
from html import escape

from offsite.cloud import privacy
from offsite.cloud.status import LOSS_SHOWN_MAX, describe_eta

PLOT_COLOUR = "#d62728"  # the loss line; tests look for it in a screenshot
REFRESH_S = 15
ROUNDS_SHOWN = 20  # rounds listed per job, the latest

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; } h3 { font-size: 15px; margin: 18px 0 6px; }
table { border-collapse: collapse; margin: 4px 0 12px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f3f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #666; } .bad { color: #a00; }
"""
_EVAL_COLUMNS = ("full_zero_shot", "emulator_zero_shot", "emulator_with_adapter", "plug_in")


def _table(header: list[str], rows: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    """`rows` hold HTML already escaped; columns in `numeric` are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round numbers (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = max((hi - lo) / max(count - 1, 1), abs(hi) * 1e-9, 1e-12)  # a range too narrow for floats still gets ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    return [first + i * step for i in range(math.ceil((hi - first) / step - 1e-9) + 1)]


def loss_plot(points: list[tuple[int, float]], width: int = 640, height: int = 280) -> str:
    """An SVG line plot of (round from 1, loss) with axes, ticks and labels."""
    left, right, top, bottom = 64, 16, 16, 48
    xs, ys = [x for x, _ in points], [min(max(y, 0.0), LOSS_SHOWN_MAX) for _, y in points]
    points = list(zip(xs, ys))
    x_lo, x_hi = min(xs) - 0.5, max(xs) + 0.5
    pad = 0.05 * ((max(ys) - min(ys)) or max(max(ys), 1.0))  # markers clear of the frame; one value sits mid-height
    y_ticks = _ticks(max(0.0, min(ys) - pad), max(ys) + pad)  # a loss is never negative
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    x_step = max(1, math.ceil((max(xs) - min(xs) + 1) / 10))  # at most about 10 labelled rounds
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="training loss per round" font-size="12" font-family="system-ui, sans-serif">']
    for y in y_ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e3e3e3"/>'
                     f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.4g}</text>')
    for x in range(min(xs), max(xs) + 1, x_step):
        parts.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{height - bottom}" y2="{height - bottom + 5}" stroke="#333"/>'
                     f'<text x="{px(x):.1f}" y="{height - bottom + 18}" text-anchor="middle">{x}</text>')
    parts.append(f'<path d="M{left},{top} V{height - bottom} H{width - right}" fill="none" stroke="#333"/>'
                 f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" text-anchor="middle">round</text>'
                 f'<text transform="translate(16 {(top + height - bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">training loss</text>')
    line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
    parts.append(f'<polyline points="{line}" fill="none" stroke="{PLOT_COLOUR}" stroke-width="3"/>')
    parts.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{PLOT_COLOUR}"><title>round {x}: {y:.4f}</title></circle>'
                 for x, y in points)
    parts.append("</svg>")
    return "".join(parts)


def _job(j: dict) -> str:
    e = escape
    shown_round = j["round"]
    out = [f"<h2>Job {e(j['job_id'])}</h2>",
           _table(["status", "round", "method", "base", "aggregator", "updates a round (selected)", "updates accepted",
                   "updates rejected", "uploads in progress"],
                  [[e(j["status"]), f"{shown_round} of {j['rounds']}", e(j["method"]), e(j["base_model"]), e(j["aggregator"]),
                    f"{j['clients_per_round']} ({j['seats']})", str(len(j["updates"])), str(len(j["rejected"])),
                    str(j["uploads_in_progress"])]], numeric=(6, 7, 8))]
    eta = describe_eta(j)
    if eta:
        out.append(f"<p>{e(eta[0].upper() + eta[1:])}.</p>")
    recent = j["round_log"][-ROUNDS_SHOWN:]
    out.append(f"<h3>Rounds{f' (the last {ROUNDS_SHOWN})' if len(j['round_log']) > ROUNDS_SHOWN else ''}</h3>")
    out.append(_table(["round", "status", "selected", "updates in", "closed because"],
                      [[str(r["round"]), e(r["status"]), str(len(r["selected"])), str(r["updates"]), e(r["reason"])]
                       for r in recent], numeric=(0, 2, 3)))
    if j["privacy"]:
        out.append(f"<p>{e(privacy.describe(j['privacy']))}</p>")
    out.append("<h3>Training loss per round</h3>")
    if j["train_loss"]:
        out.append(loss_plot([(p["round"], p["loss"]) for p in j["train_loss"]]))
        out.append('<p class="muted">Reported by the clients with their updates (not verified by the coordinator); '
                   "per round, the mean weighted by each client's training examples. Jobs with secure aggregation "
                   "or DP get no per-client losses.</p>")
    else:
        out.append('<p class="muted">No client has reported a training loss for this job.</p>')
    if j["heldout_loss"]:
        out.append("<h3>Clients' held-out loss per round</h3>")
        out.append(_table(["round", "held-out loss", "clients"], [[str(p["round"]), _number(p["loss"]), str(p["clients"])]
                                                                for p in j["heldout_loss"]], numeric=(0, 1, 2)))
        out.append('<p class="muted">The loss of the global adapter each client received, on examples it holds out '
                   "(on its emulator, before training); the mean weighted by training examples. Reported by the "
                   "clients (the job's report_heldout), not verified by the coordinator.</p>")
    if j["eval"]:
        out.append("<h3>Final evaluation (mean token loss on the held-out sets)</h3>")
        out.append(_table(["set", *_EVAL_COLUMNS], [[e(name), *(_number(row.get(c)) for c in _EVAL_COLUMNS)]
                                                    for name, row in j["eval"].items()], numeric=(1, 2, 3, 4)))
    out.append(f"<h3>Rejected updates ({len(j['rejected'])})</h3>")
    if j["rejected"]:
        out.append(_table(["round", "client", "reason"], [[str(r["round"]), e(r["client_id"]), f'<span class="bad">{e(r["reason"])}</span>']
                                                          for r in j["rejected"]], numeric=(0,)))
    return "".join(out)


def _number(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _clients(clients: list[dict], now: float) -> str:
    if not clients:
        return '<h2>Clients</h2><p class="muted">No client has enrolled yet.</p>'
    e = escape
    rows = [[e(c["name"]), e(c["id"]), e(c["activity"] or "enrolled"), f"{max(0.0, now - c['last_seen']):.0f} s ago",
             f"{c['bytes_in']:,}", f"{c['bytes_out']:,}", '<span class="bad">revoked</span>' if c["revoked"] else "no"]
            for c in clients]
    return "<h2>Clients</h2>" + _table(["name", "id", "activity", "last seen", "bytes received from it", "bytes sent to it",
                                        "revoked"], rows, numeric=(3, 4, 5))


def _serving(instances: list[dict]) -> str:
    """What each inference server (`offsite cloud infer`) reports: per model, requests and tokens."""
    if not instances:
        return ""
    e, parts = escape, ["<h2>Serving</h2>"]
    for inst in instances:
        bases = "; ".join(f"{e(name)}: queue {b['queue']}, batch {b['batch']}, {len(b['resident_adapters'])} adapter(s) "
                          f"resident ({b['resident_bytes']:,} bytes)" for name, b in inst.get("bases", {}).items())
        parts.append(f"<h3>{e(inst['instance'])}{' (draining)' if inst.get('draining') else ''}</h3>"
                     f'<p class="muted">{bases or "no base loaded"}</p>')
        rows = [[e(m), f"{v['requests']:,}", f"{v['errors']:,}", f"{v['tokens_in']:,}", f"{v['tokens_out']:,}",
                 "-" if v["mean_ttft_s"] is None else f"{v['mean_ttft_s'] * 1000:.0f} ms"]
                for m, v in inst.get("models", {}).items()]
        if rows:
            parts.append(_table(["model", "requests", "errors", "prompt tokens", "completion tokens", "mean time to first token"],
                                rows, numeric=(1, 2, 3, 4, 5)))
    return "".join(parts)


def render(status: dict, now: float | None = None) -> str:
    """The whole page for a `read_status` dict."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    jobs = "".join(_job(j) for j in status["jobs"]) or '<p class="muted">No job yet.</p>'
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="refresh" content="{REFRESH_S}"><title>offsite coordinator</title>'
            f"<style>{_STYLE}</style></head><body><h1>offsite coordinator</h1>"
            f'<p class="muted">Read-only status at {stamp}; refreshes every {REFRESH_S} s. '
            'Also: <a href="/api/status">/api/status</a> (JSON), <a href="/metrics">/metrics</a> (Prometheus).</p>'
            f"{jobs}{_serving(status.get('serving', []))}{_clients(status['clients'], now)}</body></html>")
