"""Peak host memory and throughput of HF <-> Orbax conversion at Phi-4-mini's real size.

Writes a random bf16 checkpoint with phi-4-mini's shapes (3.84B parameters, ~7.7 GB, 2 shards) to a
temp dir, then times, each in its own child process: `cp -r` of the HF dir (the baseline), HF ->
Orbax and Orbax -> HF. Peak RSS is the child's own `ru_maxrss` (os.wait4), so the numbers include
the Python + JAX + Orbax baseline, which is also measured (a child that only imports). Finally the
round-tripped shards are compared tensor by tensor with the originals (bit-exact).

Two clocks per step (the page cache is flushed with `sync` before each step starts):
  returned: until the command exits. `cp` exits as soon as its data is in the page cache;
  durable:  until a `sync` after it has returned, i.e. the output is on disk. Our converters
            write durably (TensorStore and our safetensors writer fsync before the output is
            renamed into place), so `durable` is the like-for-like comparison with `cp`.

    python benchmarks/convert_memory.py [--workdir /tmp] [--preset phi-4-mini] [--repeats 3]
                                        [--keep]

Each step runs `--repeats` times (outputs deleted between runs, off the clock); the table shows
medians and the largest peak RSS, and the individual runs are listed under it (the disk of a
shared VM is noisy: single runs of the same step here differ by up to 1.5x).

Goal (issue 3): peak RSS < 60% of the checkpoint size; throughput within 2x of `cp`.
Both ratios are printed.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

GEN = """
import numpy as np, ml_dtypes
from phi_reason.model.config import ModelConfig
from phi_reason.model.params import param_specs
from phi_reason.checkpoint.hf import write_hf
cfg = ModelConfig.preset({preset!r}, param_dtype="bfloat16")
specs = param_specs(cfg)
rng = np.random.default_rng(0)
def leaves():  # random finite bf16 bit patterns (|x| < 2), one leaf at a time
    for path, s in specs.items():
        bits = rng.integers(0, 2**16, size=s.shape, dtype=np.uint16)
        bits &= np.uint16(0xBFFF)
        yield path, bits.view(ml_dtypes.bfloat16)
        del bits
write_hf(cfg, {{p: np.dtype(ml_dtypes.bfloat16) for p in specs}}, leaves(), {out!r},
         max_shard_size={shard!r})
"""
IMPORTS_ONLY = ("import jax, orbax.checkpoint, numpy; import phi_reason.checkpoint.convert; "
                "jax.numpy.zeros(1).block_until_ready()")
TO_ORBAX = ("from phi_reason.checkpoint.convert import hf_to_orbax; "
            "hf_to_orbax({a!r}, {b!r}, progress=False)")
TO_HF = ("from phi_reason.checkpoint.convert import orbax_to_hf; "
         "orbax_to_hf({a!r}, {b!r}, max_shard_size={shard!r}, progress=False)")
COMPARE = """
import glob, os, sys
from phi_reason.checkpoint.safetensors_io import SafetensorsFile
def index(d):
    files = [SafetensorsFile(p) for p in sorted(glob.glob(os.path.join(d, "*.safetensors")))]
    return {{n: f for f in files for n in f.entries}}
a, b = index({a!r}), index({b!r})
assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
for n in a:
    x, y = a[n].read(n), b[n].read(n)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), n
print(f"{{len(a)}} tensors bit-identical")
"""


def run_child(argv):
    """Run a child process; return (wall seconds, peak RSS bytes of that child, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                         "JAX_PLATFORMS": "cpu"})
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"child failed ({p.returncode}): {' '.join(argv)[:200]}")
    return wall, usage.ru_maxrss * 1024, out


def du(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return (f"{os.cpu_count()}-core CPU ({cpu}), {mem:.0f} GB RAM, Linux {platform.release()}, "
            f"load average at start {os.getloadavg()[0]:.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--preset", default="phi-4-mini")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each step (median shown)")
    ap.add_argument("--keep", action="store_true", help="keep the temp files")
    args = ap.parse_args()
    py = sys.executable
    free = shutil.disk_usage(args.workdir).free
    root = tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir)
    hf, hf_cp, orb, hf2 = (os.path.join(root, n) for n in ("hf", "hf_cp", "orbax", "hf2"))
    try:
        print(f"machine: {machine()}")
        print(f"workdir: {root} (free disk {free / 1e9:.0f} GB)")
        wall, rss, _ = run_child([py, "-c", GEN.format(preset=args.preset, out=hf, shard="4GB")])
        size = du(hf)
        shards = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))
        print(f"random {args.preset} bf16 checkpoint: {size / 1e9:.2f} GB in {len(shards)} shards "
              f"(written in {wall:.0f} s, peak RSS {rss / 1e9:.2f} GB)\n")
        rows = []
        _, base_rss, _ = run_child([py, "-c", IMPORTS_ONLY])
        rows.append(("python+jax+orbax imports only", None, None, base_rss))
        baseline = "cp -r (baseline)"
        steps = [(baseline, ["cp", "-r", hf, hf_cp], hf_cp),
                 ("HF -> Orbax", [py, "-c", TO_ORBAX.format(a=hf, b=orb)], orb),
                 ("Orbax -> HF", [py, "-c", TO_HF.format(a=orb, b=hf2, shard="4GB")], hf2)]
        runs = {name: [] for name, _, _ in steps}
        for rep in range(args.repeats):
            for name, argv, output in steps:
                if rep:  # the previous run's (the last run's output stays for the comparison)
                    shutil.rmtree(output)
                os.sync()  # nothing written earlier may be flushed on this step's clock
                t0 = time.perf_counter()
                wall, rss, _ = run_child(argv)
                os.sync()
                runs[name].append((wall, time.perf_counter() - t0, rss))
        for name, _, _ in steps:
            rows.append((name, statistics.median(r[0] for r in runs[name]),
                         statistics.median(r[1] for r in runs[name]),
                         max(r[2] for r in runs[name])))
        cp_wall, cp_durable = next(row[1:3] for row in rows if row[0] == baseline)
        print("| step | returned s | durable s | GB/s (durable) | vs cp (returned) "
              "| vs cp + sync (durable) | peak RSS GB | RSS / checkpoint |")
        print("|---|---|---|---|---|---|---|---|")
        for name, wall, durable, rss in rows:
            if wall is None:
                print(f"| {name} | - | - | - | - | - | {rss / 1e9:.2f} | {rss / size:.0%} |")
            else:
                print(f"| {name} | {wall:.1f} | {durable:.1f} | {size / durable / 1e9:.2f} | "
                      f"{wall / cp_wall:.2f}x | {durable / cp_durable:.2f}x | {rss / 1e9:.2f} | "
                      f"{rss / size:.0%} |")
        print(f"\nmedians of {args.repeats} runs; each run as returned / durable seconds:")
        for name, _, _ in steps:
            print(f"  {name}: " + ", ".join(f"{w:.1f} / {d:.1f}" for w, d, _ in runs[name]))
        print(f"\nOrbax checkpoint on disk: {du(orb) / 1e9:.2f} GB")
        _, _, out = run_child([py, "-c", COMPARE.format(a=hf, b=hf2)])
        print(f"round trip HF -> Orbax -> HF: {out.strip()}")
        print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
              f"(1/5/15 min, {os.cpu_count()} cores)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
