"""Where each of our parameter leaves lives inside the Hugging Face state dict.

Derived only from `param_specs(cfg)`: `hf_name` ("{i}" = layer), `hf_slice` (row range inside a
fused tensor) and the logical axes. Our linears use torch's `[out, in]` order (input dims
trailing), so one layer of a leaf is a row-major reshape of its HF block: conversion moves bytes
and never transposes. A linear whose first per-layer axis is "embed" (o_proj, down_proj) has
`out = hidden` and the rest as input; every other linear has `in = hidden` (its last axis).
The embedding table, lm_head and the norms keep their HF shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..model.config import ModelConfig
from ..model.params import ParamSpec, linear_shape, param_specs

CHUNK_BYTES = 32 * 2**20  # rows moved per read/write: small next to any leaf, large for I/O


@dataclasses.dataclass(frozen=True)
class Piece:
    """One layer (or the whole leaf, layer None) of a leaf: its rows inside an HF tensor."""
    path: Tuple[str, ...]
    layer: Optional[int]
    hf_name: str
    row_start: int  # first row in the HF tensor (0 unless the HF tensor is fused)
    hf_block_shape: Tuple[int, ...]  # shape of this piece in HF layout


def layer_shape(spec: ParamSpec) -> Tuple[int, ...]:
    return spec.shape[1:] if spec.stacked else spec.shape


def hf_block_shape(spec: ParamSpec) -> Tuple[int, ...]:
    """Shape of one layer of `spec` in HF layout (rows of the fused tensor when fused): matrices
    are torch's [out, in] (`linear_shape`), vectors keep their shape."""
    shape = layer_shape(spec)
    return linear_shape(spec) if len(shape) >= 2 else shape


def hf_view(spec: ParamSpec, x: np.ndarray) -> np.ndarray:
    """One layer of a leaf (our layout) seen in HF layout: a reshape, so a view when `x` is
    C-contiguous (a fresh `np.empty` destination always is).

    Rows of the view are rows of the HF block, so a block moves in row chunks in either direction
    (`view[r0:r1] = rows` to read, `rows = view[r0:r1]` to write) as plain memory copies.
    """
    return x.reshape(hf_block_shape(spec))


def row_chunks(block_shape: Tuple[int, ...], itemsize: int,
               max_bytes: Optional[int] = None) -> List[Tuple[int, int]]:
    """[start, stop) row ranges of an HF block, each at most `max_bytes` (default CHUNK_BYTES,
    read at call time; at least one row): the unit in which tensors move between files and
    leaves (bounds staging memory)."""
    max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
    rows = block_shape[0] if block_shape else 1
    row_bytes = int(np.prod(block_shape[1:])) * itemsize if len(block_shape) > 1 else itemsize
    step = max(1, max_bytes // max(row_bytes, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def leaf_pieces(spec: ParamSpec) -> List[Piece]:
    row0 = spec.hf_slice[0] if spec.hf_slice else 0
    block = hf_block_shape(spec)
    if spec.hf_slice and spec.hf_slice[1] - spec.hf_slice[0] != block[0]:
        raise AssertionError(f"{spec.path}: hf_slice {spec.hf_slice} has "
                             f"{spec.hf_slice[1] - spec.hf_slice[0]} rows, block has {block[0]}")
    if not spec.stacked:
        return [Piece(spec.path, None, spec.hf_name, row0, block)]
    return [Piece(spec.path, i, spec.hf_name.format(i=i), row0, block)
            for i in range(spec.shape[0])]


def hf_tensor_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor name -> its expected shape, in state-dict order (embed, layer 0 .. L-1,
    final norm, lm_head)."""
    specs = param_specs(cfg)
    per_template: Dict[str, Tuple[int, ...]] = {}
    for spec in specs.values():
        block = hf_block_shape(spec)
        if spec.hf_slice:
            rows = max(spec.hf_slice[1], per_template.get(spec.hf_name, (0,))[0])
            per_template[spec.hf_name] = (rows,) + block[1:]
        else:
            per_template[spec.hf_name] = block
    out: Dict[str, Tuple[int, ...]] = {}
    layer_templates = list(dict.fromkeys(s.hf_name for s in specs.values() if s.stacked))
    layers_done = False
    for spec in specs.values():
        if spec.stacked:
            if not layers_done:
                for i in range(cfg.num_hidden_layers):
                    for t in layer_templates:
                        out[t.format(i=i)] = per_template[t]
                layers_done = True
        else:
            out[spec.hf_name] = per_template[spec.hf_name]
    _check_fused_coverage(specs, per_template)
    return out


def _check_fused_coverage(specs, per_template):
    """Fused slices must tile their HF tensor exactly (else the round trip would lose rows)."""
    ranges: Dict[str, List[Tuple[int, int]]] = {}
    for s in specs.values():
        if s.hf_slice:
            ranges.setdefault(s.hf_name, []).append(s.hf_slice)
    for name, rs in ranges.items():
        rs.sort()
        edges = [0] + [b for _, b in rs]
        if [a for a, _ in rs] != edges[:-1] or edges[-1] != per_template[name][0]:
            raise AssertionError(f"{name}: fused slices {rs} do not tile the tensor")
