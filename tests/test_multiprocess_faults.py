"""Faults of a real 2-process run (2 x 2 CPU devices): SIGTERM reaching the processes at different
steps, a process lost mid-run, and a resume on another process count."""
import json
import pathlib
import signal
import time

import numpy as np
import process_launcher
import pytest

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
RUN = ["sft", CONFIGS / "tiny_sft.yaml", "mesh.enabled=true", "output.progress=false",
       "train.steps=16", "output.save_every=1000"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def wait_for_steps(out: pathlib.Path, n: int, procs, timeout: float = 300) -> None:
    path, deadline = out / "metrics.jsonl", time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert all(p.poll() is None for p in procs), "a process ended before the signal"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.1)


def losses(out: pathlib.Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open())}


def test_sigterm_to_every_process_saves_once_exits_0_and_resume_continues_exactly(tmp_path, cache):
    full, part = tmp_path / "full", tmp_path / "part"
    process_launcher.run([*RUN, f"output.dir={full}"], 2, 2, cache)
    procs = process_launcher.start([*RUN, f"output.dir={part}"], 2, 2, cache)
    wait_for_steps(part, 3, procs)
    procs[0].send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the other process gets it a few steps later: they must agree on one step
    procs[1].send_signal(signal.SIGTERM)
    results = process_launcher.wait(procs)
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-3000:]
    saved = [int(p.name) for p in (part / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] < 16 and not (part / "final").exists()
    assert "saved checkpoint at step" in results[0][2]
    process_launcher.run([*RUN, f"output.dir={part}", "--resume"], 2, 2, cache)
    want, got = losses(full), losses(part)
    assert sorted(got) == list(range(1, 17))  # one line per step across the two runs
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)],
                               rtol=1e-6)


def test_a_lost_process_makes_the_other_exit_nonzero_naming_it(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("PHI_REASON_HEARTBEAT_TIMEOUT_S", "10")
    out = tmp_path / "lost"
    procs = process_launcher.start([*RUN, f"output.dir={out}", "train.steps=100000"], 2, 2, cache)
    wait_for_steps(out, 2, procs)
    procs[1].kill()
    t0 = time.monotonic()
    (rc, _, err), _ = process_launcher.wait(procs, timeout=120)
    assert rc != 0 and time.monotonic() - t0 < 60
    assert "Task 1 heartbeat timeout" in err or "tasks are unhealthy" in err, err[-2000:]
    assert not (out / "final").exists()


def test_resume_on_another_process_count_is_refused_naming_both(tmp_path, monkeypatch):
    """Each process resumes from its own saved data position; on another process count the
    positions are mapped when they determine the global stream position (test_multiprocess.py),
    else
    the resume stops with one clear line, unless the position is global (RL: every process runs
    the same prompt stream)."""
    from phi_reason.config import RunConfigError
    from phi_reason.jobs.trainer import Trainer
    from phi_reason.sharding import processes

    trainer = Trainer.__new__(Trainer)  # only the checkpoint-position logic is exercised
    trainer.out, trainer.source = tmp_path, type("Source", (), {})()
    data = {"iterator": {"index": 3}, "per_process": [{"index": 3}, {"index": 5}]}
    monkeypatch.setattr(processes, "process_count", lambda: 2)
    monkeypatch.setattr(processes, "process_index", lambda: 1)
    assert trainer._own_position(data, 7) == {"index": 5}
    monkeypatch.setattr(processes, "process_count", lambda: 1)
    monkeypatch.setattr(processes, "process_index", lambda: 0)
    refused = r"step 7 was written by 2 process\(es\), this run has 1"
    with pytest.raises(RunConfigError, match=refused):
        trainer._own_position(data, 7)
    assert trainer._own_position({"iterator": {"index": 3}}, 7) == {"index": 3}
    trainer.source.position_is_global = True
    assert trainer._own_position(data, 7) == {"index": 3}
