"""Device mesh from config, and multi-host (multi-controller) initialisation.

The mesh always has the three axes `data`, `fsdp`, `tensor` (in that order: `tensor` is the
innermost axis so it lands on the fastest links, e.g. NVLink inside a GPU host or the ICI torus
inside a TPU slice). Sizes are *total* axis sizes; `-1` means "the rest of the devices".

Multi-slice / multi-host layouts: `dcn_data` and `dcn_fsdp` say how many of the `data` / `fsdp`
groups sit across the slow data-centre network (TPU slices, or GPU hosts). The mesh is then built
with `mesh_utils.create_hybrid_device_mesh(per_slice_shape, dcn_shape)`, which keeps each
per-slice block on one slice/host, so only `data` / `fsdp` collectives cross the network.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from ..errors import UsageError

log = logging.getLogger(__name__)

MESH_AXES: Tuple[str, ...] = ("data", "fsdp", "tensor")


class MeshError(UsageError):
    """A mesh that cannot be built or cannot shard a tensor; the message names the axis."""


def parse_mesh(text: str) -> Dict[str, int]:
    """'data=1,fsdp=16,tensor=4' -> {'data': 1, 'fsdp': 16, 'tensor': 4} (missing axes omitted)."""
    sizes: Dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES + ("dcn_data", "dcn_fsdp"):
            raise MeshError(f"bad mesh item {item!r} in {text!r}: expected AXIS=SIZE with AXIS in "
                            f"{MESH_AXES + ('dcn_data', 'dcn_fsdp')}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshError(f"mesh axis {name!r}: size {value.strip()!r} is not an integer"
                            ) from None
    return sizes


def resolve_axis_sizes(n_devices: int, data: int = 1, fsdp: int = -1, tensor: int = 1
                       ) -> Dict[str, int]:
    """Axis sizes with at most one `-1` filled in; checks the product equals `n_devices`."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise MeshError(f"mesh axis {name!r}: size must be >= 1 or -1 (the rest), got {size}")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"mesh axes {free} are all -1; at most one axis may take the rest")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if n_devices % fixed:
            raise MeshError(
                f"mesh axis {free[0]!r} = -1 cannot take the rest: the other axes multiply to "
                f"{fixed}, which does not divide the {n_devices} devices")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        detail = " x ".join(f"{n}={s}" for n, s in sizes.items())
        raise MeshError(f"mesh axes {detail} multiply to {fixed} but there are {n_devices} devices;"
                        " set one axis to -1 to take the rest")
    return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, dcn_data: int = 1,
              dcn_fsdp: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'tensor') over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(len(devices), data, fsdp, tensor)
    shape = tuple(sizes[a] for a in MESH_AXES)
    dcn = {"data": dcn_data, "fsdp": dcn_fsdp, "tensor": 1}
    for name in ("data", "fsdp"):
        if dcn[name] < 1 or sizes[name] % dcn[name]:
            raise MeshError(f"mesh axis {name!r}: dcn_{name}={dcn[name]} must be >= 1 and divide "
                            f"the axis size {sizes[name]} (it is the number of {name} groups "
                            "placed across slices/hosts)")
    dcn_shape = tuple(dcn[a] for a in MESH_AXES)
    if np.prod(dcn_shape) > 1:
        per_slice = tuple(s // d for s, d in zip(shape, dcn_shape))
        # TPU devices carry `slice_index`; GPU hosts are the granules otherwise.
        is_tpu_multislice = hasattr(devices[0], "slice_index")
        try:
            grid = mesh_utils.create_hybrid_device_mesh(
                per_slice, dcn_shape, devices, process_is_granule=not is_tpu_multislice)
        except (ValueError, AssertionError) as e:
            raise MeshError(f"cannot lay out mesh {dict(zip(MESH_AXES, shape))} with dcn sizes "
                            f"{dict(zip(MESH_AXES, dcn_shape))}: {e}") from e
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Physical-topology placement can refuse some shapes (e.g. on a partial TPU slice);
            # fall back to the plain device order, which is always valid.
            grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg, devices: Optional[Sequence] = None) -> Mesh:
    """Build from a mapping or object with data/fsdp/tensor[/dcn_data/dcn_fsdp] entries."""
    get = (mesh_cfg.get if isinstance(mesh_cfg, Mapping)
           else lambda k, d: getattr(mesh_cfg, k, d))
    return make_mesh(data=get("data", 1), fsdp=get("fsdp", -1), tensor=get("tensor", 1),
                     dcn_data=get("dcn_data", 1), dcn_fsdp=get("dcn_fsdp", 1), devices=devices)


# ------------------------------------------------------------------ multi-host initialisation
def _slurm_first_host(node_list: str) -> str:
    """First hostname of a SLURM node list: 'gpu[003-010,012],cpu1' -> 'gpu003'."""
    cut = next((i for i, ch in enumerate(node_list) if ch in ",["), len(node_list))
    if cut == len(node_list) or node_list[cut] == ",":
        return node_list[:cut]
    inside = node_list[cut + 1:]
    end = next(i for i, ch in enumerate(inside + "]") if ch in ",-]")
    return node_list[:cut] + inside[:end]


def distributed_args(env: Mapping[str, str], coordinator: Optional[str] = None,
                     num_processes: Optional[int] = None, process_id: Optional[int] = None,
                     on_tpu_vm: bool = False) -> Tuple[str, Optional[dict]]:
    """Decide how to call `jax.distributed.initialize` (pure; `env` is os.environ).

    Returns (mode, kwargs): mode 'explicit' | 'slurm' | 'tpu' | 'single'; kwargs is None for
    'single' (do not initialise), {} for 'tpu' (JAX reads the TPU metadata itself).
    Precedence: explicit arguments, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, then a multi-task SLURM step, then a Cloud TPU VM (/dev/accel* or /dev/vfio).

    SLURM: unlike JAX's own SLURM detection (which pins each process to GPU SLURM_LOCALID), one
    task per node keeps all of the node's GPUs; one task per GPU takes GPU SLURM_LOCALID only
    when the task still sees several GPUs.
    """
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator is not None:
        missing = [n for n, v in (("num_processes", num_processes), ("process_id", process_id))
                   if v is None]
        if missing:
            raise MeshError(f"distributed init: coordinator {coordinator!r} given but {missing} "
                            "missing (flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        return "explicit", dict(coordinator_address=coordinator, num_processes=num_processes,
                                process_id=process_id)
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise MeshError("distributed init: SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST / "
                            "SLURM_JOB_NODELIST; launch with srun")
        port = env.get("JAX_COORDINATOR_PORT") or str(61440 + int(env["SLURM_JOB_ID"]) % 4096)
        kwargs = dict(coordinator_address=f"{_slurm_first_host(nodes)}:{port}",
                      num_processes=int(env["SLURM_NTASKS"]),
                      process_id=int(env["SLURM_PROCID"]))
        # One task per GPU with all of the node's GPUs visible: each task takes its own GPU.
        # One task per node (recommended) or tasks with narrowed CUDA_VISIBLE_DEVICES: use all.
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if tasks_per_node.isdigit() and int(tasks_per_node) > 1 and len(visible) > 1:
            kwargs["local_device_ids"] = [int(env["SLURM_LOCALID"])]
        return "slurm", kwargs
    if on_tpu_vm:
        # JAX reads worker count, id and coordinator from the TPU metadata server itself; on a
        # single-host slice that yields one process, so calling it is harmless there.
        return "tpu", {}
    return "single", None


def _on_tpu_vm() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, mode: Optional[str] = None) -> str:
    """Start JAX's multi-controller runtime when this is one process of several.

    Call once per process, before anything touches `jax.devices()`. `mode`: 'auto' (detect as in
    `distributed_args`), 'tpu' (force `jax.distributed.initialize()` with no arguments) or 'off';
    default: $PHI_REASON_DISTRIBUTED, else 'auto'. Returns the mode used.
    """
    mode = mode or os.environ.get("PHI_REASON_DISTRIBUTED", "auto")
    if mode == "off":
        return "single"
    if mode == "tpu":
        chosen, kwargs = "tpu", {}
    elif mode == "auto":
        chosen, kwargs = distributed_args(os.environ, coordinator, num_processes, process_id,
                                          on_tpu_vm=_on_tpu_vm())
    else:
        raise MeshError(f"distributed init mode must be 'auto', 'tpu' or 'off', got {mode!r}")
    if kwargs is None:
        return chosen
    if jax.distributed.is_initialized():  # a second stage in the same process
        return chosen
    timeout = os.environ.get("PHI_REASON_HEARTBEAT_TIMEOUT_S")
    if timeout:
        # how long the others wait for a lost process before they abort naming it (JAX: 100 s)
        kwargs = dict(kwargs, heartbeat_timeout_seconds=int(timeout))
    log.info("jax.distributed.initialize via %s: %s", chosen, kwargs)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return chosen
