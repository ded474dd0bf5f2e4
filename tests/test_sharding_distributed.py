"""Multi-host start-up decisions (pure: driven by an env dict) and mesh config parsing."""
import jax
import pytest

from phi_reason.sharding.mesh import (
    MeshError,
    _slurm_first_host,
    distributed_args,
    make_mesh,
    mesh_from_config,
    parse_mesh,
)

SLURM = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "gpu[017-020,031],login1",
         "SLURM_NTASKS_PER_NODE": "1"}


@pytest.mark.parametrize("nodes, first", [
    ("node001", "node001"), ("node001,node002", "node001"), ("gpu[017-020,031],x", "gpu017"),
    ("a[7,9-12]", "a7"), ("h100-[2-3]", "h100-2")])
def test_slurm_first_host(nodes, first):
    assert _slurm_first_host(nodes) == first


def test_single_process_does_nothing():
    assert distributed_args({}) == ("single", None)
    # one SLURM task is one process: no coordinator needed
    assert distributed_args({**SLURM, "SLURM_NTASKS": "1"}) == ("single", None)


def test_explicit_flags_and_env_take_precedence_over_slurm():
    mode, kw = distributed_args(SLURM, coordinator="10.0.0.1:1234", num_processes=2,
                                process_id=1)
    assert mode == "explicit"
    assert kw == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    env = {"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert distributed_args(env) == ("explicit", {"coordinator_address": "h0:99",
                                                  "num_processes": 4, "process_id": 2})
    with pytest.raises(MeshError, match=r"\['process_id'\] missing"):
        distributed_args({"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "4"})


def test_slurm_one_task_per_node_uses_all_local_gpus():
    mode, kw = distributed_args({**SLURM, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert mode == "slurm"
    # port = 61440 + job id mod 4096 (JAX's own SLURM convention)
    assert kw == {"coordinator_address": f"gpu017:{61440 + 123456 % 4096}",
                  "num_processes": 8, "process_id": 3}
    kw = distributed_args({**SLURM, "JAX_COORDINATOR_PORT": "5555"})[1]
    assert kw["coordinator_address"] == "gpu017:5555"


def test_slurm_task_per_gpu():
    env = {**SLURM, "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5"}
    # all 8 GPUs visible to each task: each task takes its own
    kw = distributed_args({**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})[1]
    assert kw["local_device_ids"] == [5]
    # SLURM already narrowed the task to one GPU (--gpus-per-task=1): use what is visible
    kw = distributed_args({**env, "CUDA_VISIBLE_DEVICES": "5"})[1]
    assert "local_device_ids" not in kw


def test_tpu_vm_lets_jax_detect():
    assert distributed_args({}, on_tpu_vm=True) == ("tpu", {})
    # explicit settings still win on a TPU VM
    assert distributed_args({}, "h:1", 2, 0, on_tpu_vm=True)[0] == "explicit"


def test_parse_mesh_and_config():
    assert parse_mesh("data=1, fsdp=16,tensor=4") == {"data": 1, "fsdp": 16, "tensor": 4}
    assert parse_mesh("fsdp=-1,dcn_data=2") == {"fsdp": -1, "dcn_data": 2}
    with pytest.raises(MeshError, match="bad mesh item 'model=4'"):
        parse_mesh("data=2,model=4")
    with pytest.raises(MeshError, match="'tensor': size 'four' is not an integer"):
        parse_mesh("tensor=four")
    assert dict(mesh_from_config({"data": 2, "tensor": 2}).shape) == {
        "data": 2, "fsdp": 2, "tensor": 2}

    class Section:  # the run config's dataclass section
        data, fsdp, tensor = 1, -1, 4
    assert dict(mesh_from_config(Section()).shape) == {"data": 1, "fsdp": 2, "tensor": 4}


def test_dcn_layout_needs_that_many_hosts():
    # one process = one granule: 2 data groups across hosts cannot be laid out
    assert jax.process_count() == 1
    with pytest.raises(MeshError, match=r"cannot lay out mesh .*'data': 2"):
        make_mesh(data=2, fsdp=4, tensor=1, dcn_data=2)
