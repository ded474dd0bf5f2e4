"""Conversion streams: tensors move in bounded row chunks, and no leaf outlives its turn.

Peak memory itself is measured at full size by benchmarks/convert_memory.py; here we check the
two properties it rests on, deterministically and cheaply.
"""
import gc
import weakref

import numpy as np
import pytest
from checkpoint_fixtures import FAMILIES, hf_tensors, make_hf_model, same_bits

from phi_reason.checkpoint import layout
from phi_reason.checkpoint.convert import hf_to_orbax, orbax_to_hf
from phi_reason.checkpoint.hf import HFCheckpoint
from phi_reason.checkpoint.orbax_io import (
    find_step_dir,
    iter_orbax_leaves,
    read_orbax_config,
    save_orbax,
)
from phi_reason.model.params import param_specs


def test_round_trip_exact_with_tiny_row_chunks(tmp_path, monkeypatch):
    """Chunks of a few rows: transposed chunk copies, fused-row offsets and direct reads all hit
    their chunk boundaries, and the result must still be bit-identical."""
    assert layout.row_chunks((10, 3), 4, max_bytes=30) == [(0, 2), (2, 4), (4, 6), (6, 8),
                                                          (8, 10)]
    assert layout.row_chunks((5,), 2, max_bytes=1) == [(i, i + 1) for i in range(5)]
    monkeypatch.setattr(layout, "CHUNK_BYTES", 200)  # < one row of most tensors: 1-row chunks
    cfg = FAMILIES["phi4"]  # untied: covers the one non-stacked transposed leaf (lm_head)
    make_hf_model(cfg, seed=3).save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", progress=False)
    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf2", max_shard_size="60KB", progress=False)
    a, b = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "hf2")
    assert set(a) == set(b)
    bad = [k for k in a if not same_bits(a[k], b[k])]
    assert not bad, bad


def _leaf_lifetimes(leaves):
    """Pass leaves through; record, as each next leaf is requested, whether any earlier leaf is
    still alive. With the garbage collector off, only plain references count: a leaf kept by a
    reference cycle (as a recursive flatten helper once did) shows up as alive."""
    refs, alive_when_next = [], []
    for path, leaf in leaves:
        alive_when_next.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(leaf))
        yield path, leaf
        del leaf
    alive_when_next.append(sum(r() is not None for r in refs))
    return alive_when_next


@pytest.fixture()
def gc_off():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_streaming_frees_each_leaf_before_the_next(tmp_path, gc_off):
    cfg = FAMILIES["phi4"]
    make_hf_model(cfg, seed=1).save_pretrained(tmp_path / "hf")
    seen_save, seen_restore = [], []

    def track(gen, into):
        into.extend([None])  # filled by the generator's return value below
        into[:] = yield from _leaf_lifetimes(gen)

    with HFCheckpoint(tmp_path / "hf") as ck:
        save_orbax(ck.cfg.replace(param_dtype="float32"), track(ck.iter_leaves(), seen_save),
                   tmp_path / "orbax")
    step = find_step_dir(tmp_path / "orbax")
    leaves = track(iter_orbax_leaves(step, read_orbax_config(step)), seen_restore)
    for path, leaf in leaves:  # consume like write_hf: drop each leaf before asking for the next
        del leaf
    n = len(param_specs(cfg))
    # Orbax's save never accumulates leaves; its commit thread may still hold the latest one
    # for a moment after `partial.save` returns (seen in about one run in two), hence <= 1.
    assert len(seen_save) == n + 1 and max(seen_save) <= 1, seen_save
    assert seen_restore == [0] * (n + 1)  # a restored leaf dies when the consumer drops it


def test_reused_read_buffer_gives_the_same_leaves(tmp_path):
    """HF -> Orbax reads every leaf into one buffer (valid until the next leaf is requested):
    each leaf must equal a fresh read, and consecutive leaves really share that buffer."""
    cfg = FAMILIES["phi4mini"]  # tied + fused layouts; float32 and a bf16 cast below
    make_hf_model(cfg, seed=2).save_pretrained(tmp_path / "hf")
    with HFCheckpoint(tmp_path / "hf") as ck:
        for dtype in (None, "bfloat16"):
            previous = None
            for path, leaf in ck.iter_leaves(dtype, reuse_buffer=True):
                fresh = ck.read_leaf(path, dtype)
                assert leaf.dtype == fresh.dtype and leaf.shape == fresh.shape, path
                assert leaf.tobytes() == fresh.tobytes(), path
                if previous is not None:
                    assert np.shares_memory(leaf, previous), path
                previous = leaf


def test_orbax_save_defers_fsync_to_publish_and_restores_orbax():
    """During a save TensorStore's per-file fsync is off (the output is fsynced once before it
    is renamed into place); outside it, and after an error inside it, Orbax is untouched."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    from phi_reason.checkpoint import orbax_io

    def file_io_sync():
        return tensorstore_utils.get_ts_context(use_ocdbt=True).spec.to_json().get("file_io_sync")

    original = tensorstore_utils.get_ts_context
    assert file_io_sync() is None  # Orbax's default context: TensorStore's default (sync on)
    with orbax_io._fsync_deferred_to_publish():
        assert file_io_sync() is False
        spec = tensorstore_utils.get_ts_context(use_ocdbt=True).spec.to_json()
        assert "cache_pool#ocdbt" in spec  # the rest of Orbax's context is kept
    assert tensorstore_utils.get_ts_context is original
    with pytest.raises(RuntimeError):
        with orbax_io._fsync_deferred_to_publish():
            raise RuntimeError("save failed")
    assert tensorstore_utils.get_ts_context is original
