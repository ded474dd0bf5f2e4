"""A launcher for real multi-controller runs on this machine: N local processes of one command under
`jax.distributed` (coordinator on localhost, gloo collectives on the CPU), each with `devices` CPU
devices, exactly as docs/launch.md launches them. Tests compare such runs with one process over the
same global device count."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices: int, port: int, cache) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if num_processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id),
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    return env


def start(args, num_processes: int, devices: int, cache, cwd=None, module="phi_reason.cli"):
    """Popen handles of the N processes of `python -m module *args`."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                             env=process_env(i, num_processes, devices, port, cache),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(num_processes)]


def wait(procs, timeout: float = 600) -> list:
    """[(returncode, stdout, stderr)] once every process has ended; kills all on timeout."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    return results


def run(args, num_processes: int, devices: int, cache, timeout: float = 600, **kw) -> list:
    results = wait(start(args, num_processes, devices, cache, **kw), timeout)
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} of {num_processes} exited {rc}:\n{err[-4000:]}"
    return results
