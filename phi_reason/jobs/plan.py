"""Per-device memory planner for training (and rollout KV caches) on a device mesh.

Every number is per device and derives from the same declarations the program uses:
- params / grads / optimizer: `param_specs(cfg)` shapes, divided by the shard counts of the
  PartitionSpecs that `rules.spec_for` gives them (so the GQA replication policy is counted).
  Grads are in the parameter dtype; AdamW keeps two moments (mu, nu) in `optimizer_dtype`; there
  is no float32 master copy (params are updated in `param_dtype`).
- activations: what JAX's autodiff keeps for the backward pass, measured by tracing (abstractly,
  nothing allocated) one decoder layer at the per-device shapes and listing its saved residuals
  (`saved_residuals`). With layers scanned, the forward scan stacks each layer's saved values, so
      saved   = L x residuals(layer under the remat policy)   (remat 'full': just the layer input)
      rework  = residuals(plain layer) - residuals(policy)    (one layer re-run in the backward;
                                                               0 for remat none)
      activations = saved + rework + 2 x [B, T, H] cotangents (incoming and outgoing gradient)
  Flash-style kernels (the GPU / TPU attention paths) keep no T x T tensor: for them the T x T
  residuals of the reference path are dropped and a float32 logsumexp per query and head is added.
- logits: residuals of a standard shifted cross-entropy head (final norm, LM head, log-softmax,
  gather) plus one float32 [B, T, V] cotangent, for `logits_chunk` positions at a time
  (`train.logits_chunk`; 0: the whole [B_local, T, V_local] float32 logits at once).
- forward-only log-prob passes (`forward_estimate`): the layer carry plus one layer's or the
  head's intermediates, for one micro-batch.
- KV cache (rollouts): rollout_batch x seq x layers x 2 (K and V) x nKV x head_dim in the compute
  dtype; rows are split over the batch mesh axes and KV heads over their rule's axis.
Peak = params + optimizer + max(grads + activations + logits, kv_cache): the rollout cache and
the training step's transients are not alive at the same time.

Calibration: on CPU, XLA's `compiled.memory_analysis().temp_size_in_bytes` of a value-and-grad of
the CE loss (inputs and output gradients excluded) is compared with activations + logits in
tests/test_plan.py. The sum of the backward's two phases (logits, then layers) over-estimates a
little, on purpose: the planner should err on the side of "does not fit".
"""
from __future__ import annotations

import dataclasses
import functools
import json as jsonlib
import math
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.ad_checkpoint import saved_residuals  # no public equivalent that returns values

from ..hardware import GiB, accelerator
from ..model import decoder
from ..model.config import REMAT_POLICIES, ConfigError, ModelConfig
from ..model.params import param_specs
from ..model.rope import rope_tables
from ..sharding.mesh import MESH_AXES, MeshError, parse_mesh, resolve_axis_sizes
from ..sharding.rules import merge_rules, spec_for

# Fraction of device memory a plan may use: the rest is left for XLA workspace (collectives,
# convolution/matmul scratch), fragmentation and the runtime. On GPUs also set
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX reserves only 75% by default).
USABLE_FRACTION = 0.9


@dataclasses.dataclass
class MemoryPlan:
    model: str
    mesh: Dict[str, int]
    batch: int
    seq: int
    local_batch: int
    local_seq: int
    remat: str
    attention: str
    logits_chunk: int
    param_dtype: str
    compute_dtype: str
    optimizer_dtype: str
    rollout_batch: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    saved_activations_bytes: int
    logits_bytes: int
    gathered_bytes: int
    kv_cache_bytes: int
    train_peak_bytes: int
    total_bytes: int
    accelerator: Optional[str] = None
    capacity_bytes: Optional[int] = None
    usable_bytes: Optional[int] = None
    fits: Optional[bool] = None
    notes: List[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _accelerator(name: Optional[str]):
    if name is None:
        return None, None, "reference"
    try:
        acc = accelerator(name)
    except ValueError as e:
        raise MeshError(str(e)) from None
    return acc.name, acc.memory_bytes, acc.attention


def _local(dim: int, spec_entry, sizes) -> int:
    axes = () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) \
        else spec_entry
    return dim // int(np.prod([sizes[a] for a in axes])) if axes else dim


def _local_shape(axes, shape, sizes, rules, name):
    spec = spec_for(axes, shape, sizes, rules, name=name)
    return tuple(_local(d, s, sizes) for d, s in zip(shape, tuple(spec) + (None,) * len(shape)))


def _param_elems(cfg: ModelConfig, sizes, rules) -> int:
    return sum(int(np.prod(_local_shape(s.axes, s.shape, sizes, rules, "/".join(p))))
               for p, s in param_specs(cfg).items())


def gathered_weight_bytes(cfg: ModelConfig, sizes, rules) -> tuple:
    """(one layer, embedding + LM head) bytes per device once FSDP has all-gathered them: the
    parameters' local shapes with the fsdp axis unsplit, in the parameter dtype.
    A sharded program gathers a layer's weights before using them and the whole vocabulary
    table for the embedding lookup and the LM head; the backward holds the same shapes again as
    unreduced gradients before their reduce-scatter. 0 when nothing is split over fsdp."""
    if sizes.get("fsdp", 1) == 1:
        return 0, 0
    unsplit = dict(sizes, fsdp=1)
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    layer = head = 0
    for path, s in param_specs(cfg).items():
        n = int(np.prod(_local_shape(s.axes, s.shape, unsplit, rules, "/".join(path)))) * itemsize
        if s.stacked:
            layer += n // s.shape[0]
        elif path[-1] in ("embed", "lm_head"):
            head += n
    return layer, head


def _residuals(fn, *args):
    """(bytes, aval) of each value JAX saves for fn's backward. Not counted: literals and
    constants (loop-invariant: hoisted out of the layer scan) and arguments other than the layer
    input `x` (weights are parameters; segment ids are shared by all layers)."""
    for aval, desc in saved_residuals(fn, *args):
        if desc.startswith(("from a literal", "from a constant")) or (
                desc.startswith("from the argument") and desc != "from the argument x"):
            continue
        yield int(np.prod(aval.shape)) * aval.dtype.itemsize, aval


def _residual_bytes(fn, *args, square: Optional[int] = None):
    """Bytes of the values JAX saves for fn's backward (see `_residuals`). With `square`,
    attention-score-shaped residuals are counted separately (returned second)."""
    total, square_bytes = 0, 0
    for nbytes, aval in _residuals(fn, *args):
        if square is not None and _is_scores(aval.shape, square):
            square_bytes += nbytes
        else:
            total += nbytes
    return total, square_bytes


def _is_scores(shape, t: int) -> bool:
    """An attention-score-shaped residual: [..., T, T], or [B, nKV, group x T, T] (the grouped
    query heads folded into the query axis)."""
    return len(shape) >= 4 and shape[-1] == t and shape[-2] % t == 0


def _local_cfg(cfg, sizes, rules, compute_dtype, param_dtype):
    """The per-device slice of the model as one device's layer code sees it."""
    heads = _local_shape(("heads",), (cfg.num_attention_heads,), sizes, rules, "heads")[0]
    kv = _local_shape(("kv_heads",), (cfg.num_key_value_heads,), sizes, rules, "kv_heads")[0]
    mlp = _local_shape(("mlp",), (cfg.intermediate_size,), sizes, rules, "mlp")[0]
    vocab = _local_shape(("vocab",), (cfg.vocab_size,), sizes, rules, "vocab")[0]
    if heads % kv:  # replicated KV heads serve only the local query heads' groups
        kv = math.gcd(heads, kv)
    return cfg.replace(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=mlp,
                       vocab_size=vocab, head_dim=cfg.head_dim, dtype=compute_dtype,
                       param_dtype=param_dtype, tie_word_embeddings=False)


def _layer_halves(cfg: ModelConfig, B: int, T: int):
    """(attention half, MLP half, abstract (layer params, x, segment ids)) of one decoder layer at
    [B, T] on the per-device slice `cfg`, traced with the reference attention."""
    lp = {path[-1]: jax.ShapeDtypeStruct(s.shape[1:], jnp.dtype(cfg.param_dtype))
          for path, s in param_specs(cfg).items() if s.stacked}
    x = jax.ShapeDtypeStruct((B, T, cfg.hidden_size), jnp.dtype(cfg.dtype))
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def attention_half(lp, x, seg):
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rope_tables(cfg, pos, use_long=False)
        q, k, v = decoder.attention_inputs(lp, x, cfg, cos, sin)
        attn = decoder.attention(q, k, v, seg, seg, impl="reference")
        return decoder.attention_output(lp, x, attn, cfg)

    def mlp_half(lp, x, seg):
        return decoder.mlp_block(lp, x, cfg)

    return attention_half, mlp_half, (lp, x, seg)


@functools.lru_cache(maxsize=256)
def forward_estimate(cfg: ModelConfig, local_batch: int, local_seq: int,
                     attention: str = "reference", logits_chunk: int = 0) -> int:
    """Transient bytes of one micro-batch of a forward-only token log-prob pass (the RL old-policy
    and reference passes, the DPO reference precompute: `train.policy.make_token_logprob_fn`) on
    one device; `cfg` is the per-device slice. Nothing is kept for a backward, so the peak is the
    layer carry (input and output [B, T, H]) plus the larger of: one layer's live intermediates
    (XLA frees each once consumed) and the LM head's (the hidden states reshaped into chunks, one
    chunk's float32 logits and their exp). Flash kernels: no T x T scores, a logsumexp."""
    B, T, H, V = local_batch, local_seq, cfg.hidden_size, cfg.vocab_size
    cdt = jnp.dtype(cfg.dtype).itemsize
    attention_half, mlp_half, args = _layer_halves(cfg, B, T)
    layer = 0
    for half in (attention_half, mlp_half):
        flash = attention == "flash" and half is attention_half
        largest = max(n for n, aval in _residuals(half, *args)
                      if not (flash and _is_scores(aval.shape, T)))
        # the largest op's input and output alive together with a neighbour being fused (the
        # scores and their exp; gate and up while silu(gate) * up is formed): 2.5 x the largest
        # intermediate, measured against XLA's buffers in tests/test_plan.py
        layer = max(layer, int(2.5 * largest) + (B * cfg.num_attention_heads * T * 4 if flash
                                                 else 0))
    t_head = min(logits_chunk, T) if logits_chunk else T
    head = (2 * B * T * H * cdt if logits_chunk else 0) + 2 * B * t_head * V * 4
    return 2 * B * T * H * cdt + max(layer, head)


@functools.lru_cache(maxsize=256)  # meshes in `suggest_mesh` often share per-device shapes
def activation_estimate(cfg: ModelConfig, local_batch: int, local_seq: int, remat: str,
                        attention: str = "reference", logits_chunk: int = 0):
    """(activations_bytes, saved_bytes, logits_bytes) for one device's [local_batch, local_seq]
    slice of a train step; `cfg` is already the per-device slice (see `_local_cfg`).
    attention: 'reference' (T x T scores kept) or 'flash' (kernels keeping a logsumexp).
    logits_chunk: positions of logits alive at once in the loss (`train.logits_chunk`; 0: all)."""
    B, T, H = local_batch, local_seq, cfg.hidden_size
    cdt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    attention_half, mlp_half, (lp, x, seg) = _layer_halves(cfg, B, T)
    lse = B * cfg.num_attention_heads * T * 4
    halves = []  # (plain, saved) bytes of each half's residuals, T x T ones included
    for half in (attention_half, mlp_half):
        plain, plain_sq = _residual_bytes(half, lp, x, seg, square=T)
        if remat == "none":
            saved, saved_sq = plain, plain_sq
        else:
            saved, saved_sq = _residual_bytes(
                jax.checkpoint(half, policy=decoder.remat_policy(remat)), lp, x, seg, square=T)
        if attention == "flash" and half is attention_half:
            plain_sq, saved_sq = lse, (lse if saved_sq else 0)
        halves.append((plain + plain_sq, saved + saved_sq))
    # What the stack keeps per layer: the whole layer's saved residuals (under remat the halves'
    # own inputs are recomputed values, not saved ones).
    if remat == "none":
        layer_saved = sum(saved for _, saved in halves)
    else:
        def layer(lp, x, seg):
            return mlp_half(lp, attention_half(lp, x, seg), seg)

        saved, saved_sq = _residual_bytes(jax.checkpoint(layer, policy=decoder.remat_policy(remat)),
                                          lp, x, seg, square=T)
        if attention == "flash" and saved_sq:
            saved_sq = lse
        if attention == "flash" and remat == "save_dots_attn":
            # the kernel's output and logsumexp (the reference path traced here has no kernel)
            saved_sq = B * T * cfg.num_attention_heads * cfg.head_dim * cdt.itemsize + lse
        layer_saved = saved + saved_sq
    saved_total = cfg.num_hidden_layers * layer_saved
    # The backward of a rematerialised layer needs its plain residuals again; those the policy
    # saved are read from the stack, the rest are recomputed. XLA schedules the recomputation of
    # each half next to that half's backward (the MLP's are dead before the attention's are
    # rebuilt), so the rework peak is the larger half, not their sum (measured against
    # memory_analysis in tests/test_plan.py).
    rework = 0 if remat == "none" else max(max(p - s_, 0) for p, s_ in halves)
    activations = saved_total + rework + 2 * B * T * H * cdt.itemsize

    def head(h, norm, w, tokens):
        logits = decoder.logits_from_hidden({"final_norm": norm, "lm_head": w}, h, cfg)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    # Chunked: the same head on one chunk of positions at a time (rematerialised in the backward).
    t_head = min(logits_chunk, T) if logits_chunk else T
    head_saved, _ = _residual_bytes(
        head, jax.ShapeDtypeStruct((B, t_head, H), cdt), jax.ShapeDtypeStruct((H,), pdt),
        jax.ShapeDtypeStruct((cfg.vocab_size, H), pdt),
        jax.ShapeDtypeStruct((B, t_head), jnp.int32))
    logits = head_saved + B * t_head * cfg.vocab_size * 4
    return activations, saved_total, logits


def plan_memory(cfg: ModelConfig, mesh: Dict[str, int], batch: int, seq: int,
                remat: str = "full", accelerator: Optional[str] = "h100",
                param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                optimizer_dtype: str = "float32", rollout_batch: int = 0, rules=None,
                attention: Optional[str] = None, model_name: str = "",
                logits_chunk: int = 0, accumulation_steps: int = 1) -> MemoryPlan:
    """Per-device memory of one train step (and optional rollout KV cache) on `mesh` sizes.
    `batch` is what one forward sees: the micro-batch under gradient accumulation
    (`accumulation_steps` > 1: the scan holds the gradient sum and one micro-batch's gradients).
    FSDP-gathered weights: one layer and the vocabulary table, whose shape the backward holds
    twice more (unreduced gradient; with a logits chunk the chunk scan's gradient sum and one
    chunk's term), as XLA's buffer assignment shows (tests/test_stage_plan.py)."""
    if remat not in REMAT_POLICIES:
        raise MeshError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    rules = merge_rules(rules)
    sizes = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    for a, s in sizes.items():
        if s < 1:
            raise MeshError(f"mesh axis {a!r}: size must be >= 1 for a plan, got {s}")
    acc, capacity, acc_attention = _accelerator(accelerator)
    attention = attention or acc_attention
    notes: List[str] = []

    p_bytes, o_bytes = jnp.dtype(param_dtype).itemsize, jnp.dtype(optimizer_dtype).itemsize
    elems = _param_elems(cfg, sizes, rules)
    params_bytes = elems * p_bytes
    grads_bytes = elems * p_bytes * (2 if accumulation_steps > 1 else 1)
    layer_w, head_w = gathered_weight_bytes(cfg.replace(param_dtype=param_dtype), sizes, rules)
    gathered = layer_w + (3 if logits_chunk else 2) * head_w
    optimizer_bytes = 2 * elems * o_bytes

    b_local, t_local, _ = _local_shape(("batch", "seq", "embed"), (batch, seq, cfg.hidden_size),
                                       sizes, rules, "activation")
    local = _local_cfg(cfg, sizes, rules, compute_dtype, param_dtype)
    if logits_chunk < 0:
        raise MeshError(f"logits_chunk must be >= 0 (0: no chunking), got {logits_chunk}")
    activations, saved, logits = activation_estimate(local, b_local, t_local, remat, attention,
                                                     logits_chunk)
    if t_local != seq:
        notes.append("sequence sharded at layer boundaries: attention still sees the full "
                     "sequence (K/V all-gathered); estimate uses the local length")

    kv_cache = 0
    if rollout_batch:
        rows = _local_shape(("batch",), (rollout_batch,), sizes, rules, "rollout_batch")[0]
        kv = _local_shape(("kv_heads",), (cfg.num_key_value_heads,), sizes, rules, "kv_heads")[0]
        kv_cache = (rows * seq * cfg.num_hidden_layers * 2 * kv * cfg.head_dim
                    * jnp.dtype(compute_dtype).itemsize)

    train_peak = params_bytes + optimizer_bytes + grads_bytes + activations + logits + gathered
    total = max(train_peak, params_bytes + optimizer_bytes + kv_cache)
    usable = int(capacity * USABLE_FRACTION) if capacity else None
    fits = None if usable is None else total <= usable
    return MemoryPlan(
        model=model_name, mesh=sizes, batch=batch, seq=seq, local_batch=b_local,
        local_seq=t_local, remat=remat, attention=attention, logits_chunk=logits_chunk,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype, optimizer_dtype=optimizer_dtype,
        rollout_batch=rollout_batch, params_bytes=params_bytes, grads_bytes=grads_bytes,
        optimizer_bytes=optimizer_bytes, activations_bytes=activations,
        saved_activations_bytes=saved, logits_bytes=logits, gathered_bytes=gathered,
        kv_cache_bytes=kv_cache,
        train_peak_bytes=train_peak, total_bytes=total, accelerator=acc,
        capacity_bytes=capacity, usable_bytes=usable, fits=fits, notes=notes)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_mesh(cfg: ModelConfig, devices: int, batch: int, seq: int, max_tensor: int = 8,
                 **plan_kw) -> Optional[MemoryPlan]:
    """The plan for the best mesh over `devices`: among meshes that fit, the smallest tensor
    axis (its collectives run every layer on activations), then the largest data axis (plain
    data parallelism needs no parameter all-gathers). None fit: the one with least memory."""
    plans = []
    for tensor in (t for t in _divisors(devices) if t <= max_tensor):
        for data in _divisors(devices // tensor):
            mesh = {"data": data, "fsdp": devices // tensor // data, "tensor": tensor}
            try:
                plans.append(plan_memory(cfg, mesh, batch, seq, **plan_kw))
            except MeshError:
                continue  # this mesh cannot shard the model or the batch
    if not plans:
        return None
    fitting = [p for p in plans if p.fits]
    if fitting:
        return min(fitting, key=lambda p: (p.mesh["tensor"], -p.mesh["data"]))
    return min(plans, key=lambda p: p.total_bytes)


# ------------------------------------------------------------------------------ CLI
def _load_model(model: str) -> ModelConfig:
    from ..model.config import PRESETS

    if model in PRESETS:
        return ModelConfig.preset(model)
    try:
        return ModelConfig.from_hf(model)
    except FileNotFoundError as e:
        raise ConfigError(f"--model {model!r}: neither a preset ({', '.join(PRESETS)}) nor an "
                          f"HF config.json / dir ({e})") from None


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    mesh = ",".join(f"{a}={s}" for a, s in plan.mesh.items())
    lines = [
        f"model {plan.model}  mesh {mesh} ({int(np.prod(list(plan.mesh.values())))} devices)",
        f"batch {plan.batch} x {plan.seq} -> per device {plan.local_batch} x {plan.local_seq}; "
        f"remat {plan.remat}; attention {plan.attention}; params {plan.param_dtype}, compute "
        f"{plan.compute_dtype}, optimizer {plan.optimizer_dtype}",
        "per-device memory:",
        f"  params        {_gib(plan.params_bytes)}",
        f"  grads         {_gib(plan.grads_bytes)}",
        f"  optimizer     {_gib(plan.optimizer_bytes)}   (AdamW mu + nu)",
        f"  activations   {_gib(plan.activations_bytes)}   (saved across layers: "
        f"{plan.saved_activations_bytes / GiB:.2f} GiB)",
        f"  logits        {_gib(plan.logits_bytes)}   (float32, "
        + (f"{plan.logits_chunk} positions at a time)" if plan.logits_chunk else
           "all positions at once; --logits-chunk N computes N at a time)"),
        f"  gathered      {_gib(plan.gathered_bytes)}   (FSDP: one layer's weights, the "
        "vocabulary table and its gradients)",
    ]
    if plan.rollout_batch:
        lines.append(f"  kv cache      {_gib(plan.kv_cache_bytes)}   ({plan.rollout_batch} "
                     "rollout rows; not alive during the train step)")
    lines.append(f"  total         {_gib(plan.total_bytes)}")
    if plan.fits is None:
        lines.append("verdict: no accelerator given")
    else:
        word = "FITS" if plan.fits else "DOES NOT FIT"
        lines.append(f"verdict: {word} on {plan.accelerator} ({plan.capacity_bytes / GiB:.1f} GiB"
                     f", {USABLE_FRACTION:.0%} usable = {plan.usable_bytes / GiB:.1f} GiB)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def main(**kwargs) -> int:
    """`phi-reason plan` (see `_main`). Under several processes (srun, a TPU pod) every process
    computes the same plan and process 0 alone prints it."""
    import contextlib
    import io

    from ..sharding import processes
    from ..sharding.mesh import initialize_distributed

    initialize_distributed()
    if processes.is_lead():
        return _main(**kwargs)
    with contextlib.redirect_stdout(io.StringIO()):
        return _main(**kwargs)


def _main(model=None, mesh=None, devices=None, batch=1, seq=4096, remat="full", accelerator=None,
          param_dtype="float32", compute_dtype="bfloat16", optimizer_dtype="float32",
          rollout_batch=0, json=False, logits_chunk=0, config=None, stage=None,
          overrides=()) -> int:
    """`phi-reason plan`: with a CONFIG.yaml every program of its stage on its target
    (`stage_plan`); with --model one train step's per-device plan (or a suggested mesh for
    --devices). A bad model / mesh / batch raises a UsageError (MeshError, ConfigError)."""
    if (config is None) == (model is None):
        raise MeshError("plan: give a CONFIG.yaml (every program of that stage) or --model "
                        "(one train step), not both")
    if config is not None:
        from .stage_plan import main as stage_main
        return stage_main(config, stage, accelerator, devices, overrides, json)
    accelerator = accelerator or "h100"
    cfg = _load_model(model)
    kw = dict(remat=remat, accelerator=accelerator, param_dtype=param_dtype,
              compute_dtype=compute_dtype, optimizer_dtype=optimizer_dtype,
              rollout_batch=rollout_batch, model_name=model, logits_chunk=logits_chunk)
    suggestion = None
    if mesh is not None:
        sizes = {a: 1 for a in MESH_AXES} | parse_mesh(mesh)
        if devices is None and -1 in sizes.values():
            raise MeshError(f"plan: mesh {mesh!r} has a -1 axis; give --devices N to size it")
        n = devices or int(np.prod(list(sizes.values())))
        sizes = resolve_axis_sizes(n, sizes["data"], sizes["fsdp"], sizes["tensor"])
        plan = plan_memory(cfg, sizes, batch, seq, **kw)
        if devices and not plan.fits:
            suggestion = suggest_mesh(cfg, devices, batch, seq, **kw)
    elif devices:
        plan = suggest_mesh(cfg, devices, batch, seq, **kw)
        if plan is None:
            raise MeshError(f"no (data, fsdp, tensor) mesh over {devices} devices can shard "
                            f"{model} with batch {batch}")
    else:
        raise MeshError("plan: give --mesh (e.g. data=1,fsdp=16,tensor=4) or --devices N")
    if json:
        out = plan.to_json()
        if suggestion is not None:
            out["suggested_mesh"] = suggestion.mesh
        print(jsonlib.dumps(out))
        return 0
    if mesh is None:
        print(f"suggested mesh for {devices} devices:")
    print(format_plan(plan))
    if suggestion is not None and suggestion.mesh != plan.mesh:
        mesh_text = ",".join(f"{a}={s}" for a, s in suggestion.mesh.items())
        state = "fits" if suggestion.fits else "least memory, still does not fit"
        print(f"suggestion: --mesh {mesh_text} ({state}: "
              f"{suggestion.total_bytes / GiB:.2f} GiB per device)")
    return 0
