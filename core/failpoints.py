"""Named crash points for fault-injection tests, in the style of FreeBSD fail(9) and TiKV's fail-rs.

OFFSITE_FAILPOINTS="client.download.chunk=3,cloud.update.accepted=1" makes the process kill itself with
SIGKILL (a real `kill -9`: no cleanup, no flush) the 3rd time `hit("client.download.chunk")` runs. The
variable is read once; when it is unset, as always outside tests, `hit` is a dictionary lookup.
"""
from __future__ import annotations

import os
import signal

from offsite.errors import ConfigError


def _parse(spec: str) -> dict[str, int]:
    points = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"OFFSITE_FAILPOINTS item {item!r} must be name=N with N >= 1")
        points[name] = int(count)
    return points


_armed = _parse(os.environ.get("OFFSITE_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Count a pass through `name`; on the armed count, die as `kill -9` would."""
    if name in _armed:
        _armed[name] -= 1
        if _armed[name] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
