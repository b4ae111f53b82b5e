"""offsite.memory: freed tensor memory goes back to the system (glibc's heap would keep it)."""
import subprocess
import sys

import pytest

CHILD = r"""
import sys, torch
from offsite.memory import return_freed_memory
if sys.argv[1] == "on":
    assert return_freed_memory()
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) // 1024
before = anon()
keep = []
for i in range(40):  # what casting weights layer by layer does: large blocks freed, small ones kept between
    big = torch.ones(3_000_000)  # 12 MB: below glibc's raised threshold, so from the heap
    keep.append(torch.ones(1000))
    del big
print(anon() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; glibc only")
def test_freed_blocks_are_returned_rather_than_kept_by_the_heap():
    def grown(mode: str) -> int:
        env_free = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* from the caller
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env_free)
        return int(out.stdout.split()[-1])
    # a first large free raises glibc's threshold; after that the heap grows and keeps what was freed
    assert grown("on") < 16 <= grown("off")
