"""`phi-reason convert`: HF safetensors dir <-> Orbax checkpoint, streaming one leaf at a time,
with a progress bar over the tensors' bytes."""
from __future__ import annotations

import contextlib
import sys

from .common import dtype_name
from .hf import HFCheckpoint, write_hf
from .orbax_io import (
    find_step_dir,
    iter_orbax_leaves,
    orbax_leaf_dtypes,
    read_orbax_config,
    save_orbax,
)


@contextlib.contextmanager
def _progress_bar(total_bytes: int, desc: str, enabled: bool):
    from tqdm import tqdm
    bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not enabled,
               file=sys.stderr, dynamic_ncols=True)

    def update(name: str, nbytes: int):
        bar.set_postfix_str(name, refresh=False)
        bar.update(nbytes)

    try:
        yield update
    finally:
        bar.close()


def hf_to_orbax(hf_dir, out, dtype=None, overwrite=False, progress=True):
    """Hugging Face checkpoint dir -> Orbax checkpoint (`out/0/state`), keeping dtypes unless
    `dtype` is given. Everything is validated before anything is written."""
    with HFCheckpoint(hf_dir) as ck:
        cfg = ck.cfg
        dtypes = ck.leaf_dtypes(dtype)
        cfg = cfg.replace(param_dtype=dtype_name(dtypes[("embed",)]))
        total = sum(_nbytes(ck.cfg, p, dt) for p, dt in dtypes.items())
        with _progress_bar(total, "hf -> orbax", progress) as update:
            # save_orbax writes each leaf before asking for the next: one read buffer serves all
            leaves = ck.iter_leaves(dtype, reuse_buffer=True)
            path = save_orbax(cfg, leaves, out, overwrite=overwrite, progress=update)
    print(f"wrote Orbax checkpoint {path}", file=sys.stderr)


def orbax_to_hf(ckpt, out, tokenizer_from=None, max_shard_size="5GB", dtype=None,
                overwrite=False, progress=True):
    """Orbax checkpoint (a step dir or a CheckpointManager root: latest step) -> HF dir."""
    step_dir = find_step_dir(ckpt)
    cfg = read_orbax_config(step_dir)
    dtypes = orbax_leaf_dtypes(step_dir, cfg)
    total = sum(_nbytes(cfg, p, dtype or dt) for p, dt in dtypes.items())
    with _progress_bar(total, "orbax -> hf", progress) as update:
        path = write_hf(cfg, dtypes, iter_orbax_leaves(step_dir, cfg), out,
                        tokenizer_from=tokenizer_from, max_shard_size=max_shard_size,
                        dtype=dtype, overwrite=overwrite, progress=update)
    print(f"wrote Hugging Face checkpoint {path}", file=sys.stderr)


def _nbytes(cfg, path, dtype) -> int:
    import numpy as np

    from ..model.params import param_specs
    from .common import resolve_dtype
    return int(np.prod(param_specs(cfg)[path].shape)) * resolve_dtype(dtype).itemsize
