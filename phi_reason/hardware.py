"""The one table of accelerator peaks: dense bf16 FLOP/s, HBM bytes/s and device memory.

Used by the memory planner (`phi-reason plan --accelerator`), the trainer's MFU estimate and the GPU
benchmark suite. Figures are vendor data-sheet peaks (dense, no sparsity); memory is what the
runtime reports for the device (nvidia-smi's total on GPUs).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

MiB, GiB = 2 ** 20, 2 ** 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bytes_per_s: float
    memory_bytes: int
    device_kinds: Tuple[str, ...]  # lower-case substrings of jax's `device.device_kind`
    aliases: Tuple[str, ...] = ()
    attention: str = "flash"  # the attention path the planner assumes


# Order matters for device-kind matching: more specific substrings first.
ACCELERATORS = {a.name: a for a in (
    Accelerator("h100-pcie", 756e12, 2.0e12, 81559 * MiB, ("h100 pcie",)),
    Accelerator("h100", 989e12, 3.35e12, 81559 * MiB, ("h100",), ("h100-80gb", "h100-sxm")),
    Accelerator("h200", 989e12, 4.8e12, 143771 * MiB, ("h200",), ("h200-141gb",)),
    Accelerator("a100", 312e12, 2.039e12, 81920 * MiB, ("a100",), ("a100-80gb",)),
    Accelerator("l4", 121e12, 0.3e12, 23034 * MiB, ("l4",)),
    Accelerator("v4", 275e12, 1.2e12, 32 * GiB, ("tpu v4",), ("tpu-v4",)),
    Accelerator("v5e", 197e12, 0.819e12, 16 * GiB, ("v5 lite", "v5e"), ("tpu-v5e", "v5litepod")),
    Accelerator("v5p", 459e12, 2.765e12, 95 * GiB, ("v5p", "tpu v5"), ("tpu-v5p",)),
    Accelerator("v6e", 918e12, 1.64e12, 32 * GiB, ("v6 lite", "v6e", "tpu v6"),
                ("tpu-v6e", "trillium")),
)}


def accelerator(name: str) -> Accelerator:
    """By name or alias (case-insensitive); a ValueError lists the known names."""
    key = name.lower()
    for acc in ACCELERATORS.values():
        if key == acc.name or key in acc.aliases:
            return acc
    raise ValueError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")


def for_device_kind(kind: str) -> Optional[Accelerator]:
    """The table entry for a jax `device_kind` string, or None (CPU, unknown chips)."""
    kind = kind.lower()
    for acc in ACCELERATORS.values():
        if any(s in kind for s in acc.device_kinds):
            return acc
    return None


def peak_flops_per_device(device=None) -> Optional[float]:
    import jax
    acc = for_device_kind((device or jax.devices()[0]).device_kind)
    return acc.peak_flops if acc else None
