"""A built wheel is complete: the run configs and the CPU kernel source ship inside the package.

The wheel is built offline (no build isolation, no downloads) from a copy of the checkout, so the
checkout gets no build/ or egg-info litter and no stale build/lib from an earlier build can leak in.
Offline needs a setuptools that builds wheels by itself (>= 70.1) or the `wheel` package; with
neither (a bare Python's bundled setuptools 65.5) pip builds in an isolated env, as
`pip install .` would, fetching setuptools from the package index.
It is installed with `pip install --target` into a temporary site dir and imported in a subprocess
whose cwd is outside the checkout and whose PYTHONPATH is that site dir alone; PYTHONPATH comes
before site-packages, so the editable install's finder (appended to sys.meta_path by its .pth) never
gets asked, and the subprocess asserts that phi_reason really came from the site dir.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_ROOT_JUNK = {".git", "build", "dist", ".pytest_cache", "demo_out", ".whl"}
_ANY_JUNK = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")


def _junk(folder, names):
    """What the copy of the checkout leaves out: VCS and build outputs (.gitignore's list)."""
    root = Path(folder).resolve() == REPO
    return _ANY_JUNK(folder, names) | ({n for n in names if n in _ROOT_JUNK} if root else set())

CHECK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import yaml
    site = Path(sys.argv[1]).resolve()
    import phi_reason
    pkg = Path(phi_reason.__file__).resolve().parent
    assert pkg.is_relative_to(site), f"phi_reason imported from {pkg}, not from {site}"
    from phi_reason import demo
    from phi_reason.model import cpu_flash
    demo_cfg = Path(demo.DEFAULT_CONFIG).resolve()
    spec = yaml.safe_load(demo_cfg.read_text())
    print(json.dumps({
        "pkg": str(pkg),
        "demo_config": str(demo_cfg),
        "demo_config_is_file": demo_cfg.is_file(),
        "demo_keys": sorted(spec) if isinstance(spec, dict) else None,
        "configs": sorted(p.name for p in demo_cfg.parent.glob("*.yaml")),
        "cpu_flash_source": str(Path(cpu_flash.SOURCE).resolve()),
        "cpu_flash_source_is_file": Path(cpu_flash.SOURCE).is_file(),
    }))
""")


def _offline_build_possible() -> bool:
    """Whether the running env's setuptools can build the wheel without pip's isolated build env."""
    try:
        import setuptools
    except ImportError:
        return False
    major_minor = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    return major_minor >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_wheel_ships_configs_and_kernel_source(tmp_path):
    src, wheels, site, work = (tmp_path / d for d in ("src", "wheels", "site", "work"))
    shutil.copytree(REPO, src, ignore=_junk)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", str(src), "--no-deps", "-w", str(wheels)]
    if _offline_build_possible():
        build.append("--no-build-isolation")
        env["PIP_NO_INDEX"] = "1"  # nothing may be downloaded
    proc = subprocess.run(build, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = wheels.glob("phi_reason-*.whl")
    proc = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    proc = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=work, capture_output=True,
                          text=True, timeout=600, env={**env, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    pkg = Path(got["pkg"])
    assert Path(got["demo_config"]).is_relative_to(pkg), got
    assert got["demo_config_is_file"] and "quick" in got["demo_keys"], got
    assert got["configs"] == sorted(p.name for p in (REPO / "configs").glob("*.yaml")), got
    assert Path(got["cpu_flash_source"]).is_relative_to(pkg), got
    assert got["cpu_flash_source_is_file"], got
