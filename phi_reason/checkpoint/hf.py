"""Hugging Face checkpoint directories <-> our parameter leaves, one leaf at a time.

Reading validates everything that can be checked from headers (config, architecture, tensor
names, shapes, dtypes, file integrity) before any data is read, then yields leaves one by one so
that callers (Orbax save, device_put onto a mesh) never need the whole model in host memory.
Writing lays out all shards up front and fills them leaf by leaf into a temporary directory that is
renamed into place only when complete.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import numpy as np

from ..model.config import ConfigError, ModelConfig
from ..model.params import flatten_params, param_specs, unflatten_params
from .common import CheckpointError, atomic_output_dir, dtype_name, parse_size, resolve_dtype
from .layout import hf_tensor_shapes, hf_view, leaf_pieces, row_chunks
from .safetensors_io import SafetensorsFile, SafetensorsWriter

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_GLOBS = ("*.tiktoken",)

Leaf = Tuple[Tuple[str, ...], np.ndarray]
ProgressFn = Callable[[str, int], None]  # (tensor or leaf name, bytes done)


def is_hf_dir(path) -> bool:
    path = os.fspath(path)
    return (os.path.isfile(os.path.join(path, "config.json"))
            and bool(glob.glob(os.path.join(path, "*.safetensors"))))


def read_hf_config(hf_dir) -> ModelConfig:
    hf_dir = os.fspath(hf_dir)
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: not a directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir}: config.json not found (not a Hugging Face checkpoint "
                              "directory?)")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    archs = d.get("architectures")
    if not archs or "Phi3ForCausalLM" not in archs:
        raise CheckpointError(f"{path}: architectures is {archs!r}; only Phi3ForCausalLM "
                              "(the Phi-4 family) is supported")
    try:
        return ModelConfig.from_hf(d)
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None


class HFCheckpoint:
    """An HF checkpoint directory, validated against `cfg`, read one leaf at a time."""

    def __init__(self, hf_dir, cfg: Optional[ModelConfig] = None):
        self.dir = os.fspath(hf_dir)
        self.cfg = cfg if cfg is not None else read_hf_config(self.dir)
        self.files: Dict[str, SafetensorsFile] = {}
        self.file_of: Dict[str, SafetensorsFile] = {}
        try:
            self._open_files()
            self._validate()
        except BaseException:
            self.close()
            raise

    def _open_files(self):
        index_path = os.path.join(self.dir, INDEX_FILE)
        weight_map = None
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: malformed index ({e!r})") from None
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(os.path.basename(p)
                           for p in glob.glob(os.path.join(self.dir, "*.safetensors")))
        if not names:
            raise CheckpointError(f"{self.dir}: no *.safetensors files found")
        for name in names:
            path = os.path.join(self.dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index_path}: lists {name}, which does not exist")
            st = SafetensorsFile(path)
            self.files[name] = st
            for t in st.entries:
                if t in self.file_of:
                    raise CheckpointError(f"tensor {t} appears in both {self.file_of[t].path} and "
                                          f"{path}")
                self.file_of[t] = st
        if weight_map is not None:
            for t, fname in weight_map.items():
                if t not in self.files[fname].entries:
                    raise CheckpointError(f"{index_path}: maps tensor {t} to {fname}, which does "
                                          "not contain it")
            unindexed = sorted(set(self.file_of) - set(weight_map))
            if unindexed:
                raise CheckpointError(f"{index_path}: tensors {unindexed[:5]} are in the shards "
                                      "but not in the index")

    def _validate(self):
        expected = hf_tensor_shapes(self.cfg)
        missing = [n for n in expected if n not in self.file_of]
        if missing:
            raise CheckpointError(f"{self.dir}: missing tensor {missing[0]}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                  + " expected by config.json")
        extra = sorted(set(self.file_of) - set(expected))
        if extra:
            why = (" (config.json says tie_word_embeddings=true)"
                   if "lm_head.weight" in extra and self.cfg.tie_word_embeddings else "")
            raise CheckpointError(f"{self.file_of[extra[0]].path}: unexpected tensor {extra[0]}"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                                  + why)
        for name, shape in expected.items():
            got = self.file_of[name].entries[name].shape
            if got != shape:
                raise CheckpointError(f"{self.file_of[name].path}: tensor {name} has shape "
                                      f"{list(got)}, config.json implies {list(shape)}")

    def stored_dtype(self, path: Tuple[str, ...]):
        spec = param_specs(self.cfg)[path]
        dtypes = {self.file_of[p.hf_name].entries[p.hf_name].dtype for p in leaf_pieces(spec)}
        if len(dtypes) > 1:
            raise CheckpointError(f"{self.dir}: tensors of {'/'.join(path)} "
                                  f"({spec.hf_name}) mix dtypes {sorted(map(str, dtypes))}")
        return dtypes.pop()

    def read_leaf(self, path: Tuple[str, ...], dtype=None,
                  buffer: Optional[np.ndarray] = None) -> np.ndarray:
        """One leaf in our layout. The destination is allocated once (or is the front of
        `buffer`, a uint8 array at least the leaf's size) and filled in row chunks of each HF
        tensor (cast on the way in when a dtype is asked for), so the only memory beyond the
        leaf is one chunk."""
        spec = param_specs(self.cfg)[path]
        dt = resolve_dtype(dtype) or self.stored_dtype(path)
        if buffer is None:
            out = np.empty(spec.shape, dt)
        else:
            out = buffer[:int(np.prod(spec.shape)) * dt.itemsize].view(dt).reshape(spec.shape)
        for p in leaf_pieces(spec):
            st = self.file_of[p.hf_name]
            dst = hf_view(spec, out if p.layer is None else out[p.layer])
            direct = dst.flags.c_contiguous and dst.dtype == st.entries[p.hf_name].dtype
            for r0, r1 in row_chunks(p.hf_block_shape, dst.dtype.itemsize):
                rows = (p.row_start + r0, p.row_start + r1)
                if direct:  # same layout and dtype: read straight into the leaf
                    st.read_rows(p.hf_name, *rows, out=dst[r0:r1])
                else:
                    dst[r0:r1] = st.read_rows(p.hf_name, *rows)
        return out

    def iter_leaves(self, dtype=None, reuse_buffer: bool = False) -> Iterator[Leaf]:
        """(path, leaf) in declaration order. With `reuse_buffer`, every leaf is read into one
        buffer the size of the largest, so each leaf is valid only until the next is requested:
        for a consumer that writes each leaf out and drops it (HF -> Orbax). Why: on a host whose
        memory is full of page cache, first-touching fresh pages runs near 0.8 GB/s (the kernel
        reclaims each one), slower than the disk, and a fresh array per leaf pays that for the
        whole model; one buffer pays it once."""
        dtypes = self.leaf_dtypes(dtype)
        buffer = None
        if reuse_buffer:
            buffer = np.empty(max(int(np.prod(spec.shape)) * dtypes[p].itemsize
                                  for p, spec in param_specs(self.cfg).items()), np.uint8)
        for path in param_specs(self.cfg):
            yield path, self.read_leaf(path, dtypes[path], buffer)

    def leaf_dtypes(self, dtype=None) -> Dict[Tuple[str, ...], np.dtype]:
        want = resolve_dtype(dtype)
        return {p: want or self.stored_dtype(p) for p in param_specs(self.cfg)}

    def nbytes(self) -> int:
        return sum(os.path.getsize(f.path) for f in self.files.values())

    def close(self):
        for f in self.files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_hf_params(hf_dir, cfg: Optional[ModelConfig] = None, dtype=None) -> dict:
    """The whole parameter pytree (numpy arrays) of an HF checkpoint directory."""
    with HFCheckpoint(hf_dir, cfg) as ck:
        return unflatten_params(dict(ck.iter_leaves(dtype)))


# ------------------------------------------------------------------------------ writing


def _shard_plan(tensors: Mapping[str, Tuple[Tuple[int, ...], np.dtype]], max_bytes: int):
    """Greedy in state-dict order (as transformers): a new shard when the next tensor would
    overflow; a single tensor larger than the limit gets a shard of its own."""
    shards, cur, cur_bytes = [], [], 0
    for name, (shape, dt) in tensors.items():
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    shards.append(cur)
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    k = len(shards)
    return {f"model-{i + 1:05d}-of-{k:05d}.safetensors": s for i, s in enumerate(shards)}


def generation_config(cfg: ModelConfig) -> dict:
    stops = list(cfg.stop_token_ids)
    d = {"bos_token_id": cfg.bos_token_id,
         "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
         "pad_token_id": cfg.pad_token_id}
    return {k: v for k, v in d.items() if v is not None}


def tokenizer_files(src) -> list:
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: tokenizer source directory not found")
    found = [os.path.join(src, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for pattern in TOKENIZER_GLOBS:
        found += sorted(glob.glob(os.path.join(src, pattern)))
    if not found:
        raise CheckpointError(f"{src}: no tokenizer files found (looked for "
                              f"{', '.join(TOKENIZER_FILES + TOKENIZER_GLOBS)})")
    return found


def write_hf(cfg: ModelConfig, leaf_dtypes: Mapping[Tuple[str, ...], np.dtype],
             leaves: Iterable[Leaf], out, tokenizer_from=None, max_shard_size="5GB", dtype=None,
             overwrite: bool = False, progress: Optional[ProgressFn] = None) -> str:
    """Write an HF checkpoint directory from leaves arriving one at a time.

    `leaf_dtypes` (every leaf's dtype, known before data arrives, e.g. from Orbax metadata)
    fixes the shard layout up front. `dtype` casts on the way out; default keeps each dtype.
    """
    specs = param_specs(cfg)
    want = resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    tok_files = tokenizer_files(tokenizer_from) if tokenizer_from else []
    if set(leaf_dtypes) != set(specs):
        raise CheckpointError(f"parameter tree does not match the config: missing "
                              f"{sorted(set(specs) - set(leaf_dtypes))[:3]}, unexpected "
                              f"{sorted(set(leaf_dtypes) - set(specs))[:3]}")
    hf_dtype: Dict[str, np.dtype] = {}  # concrete HF tensor name -> dtype written
    for path, spec in specs.items():
        dt = want or np.dtype(leaf_dtypes[path])
        for p in leaf_pieces(spec):
            prev = hf_dtype.setdefault(p.hf_name, dt)
            if prev != dt:
                raise CheckpointError(f"leaves fused into {p.hf_name} have different dtypes "
                                      f"({prev}, {dt}); pass dtype= to cast")
    tensors = {name: (shape, hf_dtype[name]) for name, shape in hf_tensor_shapes(cfg).items()}
    plan = _shard_plan(tensors, max_bytes)
    config_dtype = dtype_name(hf_dtype[specs[("embed",)].hf_name])

    with atomic_output_dir(out, overwrite) as tmp:
        writers, where = {}, {}
        try:
            for fname, names in plan.items():
                writers[fname] = SafetensorsWriter(
                    os.path.join(tmp, fname), [(n, tensors[n][1], tensors[n][0]) for n in names],
                    {"format": "pt"})
                where.update({n: writers[fname] for n in names})
            seen = set()
            for path, leaf in leaves:
                spec = specs[path]
                leaf = np.asarray(leaf)
                if leaf.shape != spec.shape:
                    raise CheckpointError(f"leaf {'/'.join(path)} has shape {leaf.shape}, config "
                                          f"implies {spec.shape}")
                for p in leaf_pieces(spec):
                    src = hf_view(spec, leaf if p.layer is None else leaf[p.layer])
                    dt = hf_dtype[p.hf_name]
                    for r0, r1 in row_chunks(p.hf_block_shape, dt.itemsize):
                        # casts one chunk at a time (no copy when the dtype already matches)
                        rows = np.ascontiguousarray(src[r0:r1], dtype=dt)
                        where[p.hf_name].write(p.hf_name, p.row_start + r0, rows)
                        del rows
                    if progress:
                        progress(p.hf_name, src.size * dt.itemsize)
                seen.add(path)
                del leaf
            if seen != set(specs):
                raise CheckpointError(f"leaves missing: {sorted(set(specs) - seen)[:3]}")
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        if len(plan) > 1:
            index = {"metadata": {"total_size": sum(w.nbytes for w in writers.values())},
                     "weight_map": {n: f for f, names in plan.items() for n in sorted(names)}}
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            _write_json(os.path.join(tmp, INDEX_FILE), index)
        _write_json(os.path.join(tmp, "config.json"),
                    cfg.replace(param_dtype=config_dtype).to_hf())
        _write_json(os.path.join(tmp, "generation_config.json"), generation_config(cfg))
        for f in tok_files:
            shutil.copy2(f, os.path.join(tmp, os.path.basename(f)))
    return os.path.abspath(os.fspath(out))


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_hf(cfg: ModelConfig, params: dict, out, tokenizer_from=None, max_shard_size="5GB",
            dtype=None, overwrite: bool = False, progress: Optional[ProgressFn] = None) -> str:
    """An in-memory parameter pytree (numpy or jax arrays) -> HF checkpoint directory."""
    flat = flatten_params(params)
    dtypes = {p: np.dtype(x.dtype) for p, x in flat.items()}
    return write_hf(cfg, dtypes, flat.items(), out, tokenizer_from, max_shard_size, dtype,
                    overwrite, progress)
