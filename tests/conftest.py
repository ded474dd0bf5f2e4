"""Test setup: 8 virtual CPU devices (sharding tests), float32 matmuls at full precision."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_MATH = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "math"


@pytest.fixture(scope="session")
def shared_math_dir():
    """../shared/data/math beside the checkout; tests that need it skip when it is absent."""
    d = pathlib.Path(os.environ.get("PHI_REASON_MATH_DATA", SHARED_MATH))
    if not d.is_dir():
        pytest.skip(f"shared math data not found at {d}")
    return d
