"""Peak memory of the coordinator's streamed aggregation, for 1 and for 20 client updates of ~64 MiB each.

    .venv/bin/python bench/aggregation.py [--updates 1 20 --tensors 16 --side 1024]

Each update (float32 tensors, `--tensors` of side x side) is saved once as safetensors in a temporary folder.
For each count, a fresh subprocess loads the global adapter, resets the kernel's high-water mark
(/proc/self/clear_refs) so that VmHWM restarts at the current VmRSS, then aggregates as a round close does:
WeightedMean.add(load_file(path), examples) over the files, then FedAvg().step. Reported: VmHWM minus that
baseline, in MiB and as a multiple of one update. Streaming works when the peak does not grow with the count.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
from safetensors.torch import load_file
from offsite.cloud.aggregate import FedAvg, WeightedMean
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
global_ = load_file(sys.argv[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
baseline = status("VmRSS:")
start = time.perf_counter()
mean = WeightedMean()
for i, path in enumerate(sys.argv[2:]):
    mean.add(load_file(path), float(100 + i))
new, _ = FedAvg().step(global_, mean.result(), {})
seconds = time.perf_counter() - start
print(json.dumps({"baseline_rss": baseline, "vm_hwm": status("VmHWM:"), "seconds": seconds}))
"""


def write_updates(folder: Path, count: int, tensors: int, side: int) -> tuple[Path, list[Path]]:
    """The global adapter and `count` client updates, each `tensors` float32 side x side tensors."""
    import torch
    from safetensors.torch import save_file
    paths = []
    for i in range(count + 1):
        gen = torch.Generator().manual_seed(i)
        paths.append(folder / f"update-{i}.safetensors")
        save_file({f"layer{j}.weight": torch.randn(side, side, generator=gen) for j in range(tensors)}, str(paths[-1]))
    return paths[0], paths[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--side", type=int, default=1024)
    args = parser.parse_args()
    update_bytes = args.tensors * args.side * args.side * 4
    results = {"update_bytes": update_bytes, "tensors": args.tensors, "side": args.side, "runs": {}}
    print(f"one update: {args.tensors} float32 tensors of {args.side}x{args.side} = {update_bytes / 2**20:.0f} MiB")
    print(f"{'updates':>7}  {'peak above baseline':>19}  {'x one update':>12}  {'seconds':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        global_path, update_paths = write_updates(Path(tmp), max(args.updates), args.tensors, args.side)
        for n in args.updates:
            out = subprocess.run([sys.executable, "-c", CHILD, str(global_path), *map(str, update_paths[:n])],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["peak_bytes"] = r["vm_hwm"] - r["baseline_rss"]
            r["peak_over_update"] = round(r["peak_bytes"] / update_bytes, 2)
            results["runs"][str(n)] = r
            print(f"{n:>7}  {r['peak_bytes'] / 2**20:>15.0f} MiB  {r['peak_over_update']:>11.2f}x  {r['seconds']:>7.2f}",
                  flush=True)
    first, last = (results["runs"][str(n)]["peak_bytes"] for n in (args.updates[0], args.updates[-1]))
    results["ratio"] = round(last / first, 2)
    print(f"peak for {args.updates[-1]} updates / peak for {args.updates[0]}: {results['ratio']:.2f}x (aim: <= 3x)")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "aggregation.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
