"""Run configs: a dataclass schema, loaded from YAML plus dotted `key=value` overrides.

    cfg = load_run_config("configs/tiny_sft.yaml", ["train.lr=3e-4", "data.packed=true"])

Every key is checked against the schema: an unknown key is an error that names the file and the
dotted key and suggests the closest valid key (difflib); a wrongly typed value names the key and
the expected type. Override values are parsed as YAML scalars (`true`, `1e-5`, `[a, b]`, `null`).

Other run kinds (the RL loop) extend `RunConfig` by subclassing it and passing their class as
`schema=` to `load_run_config`; the loader works for any nested dataclass schema.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .errors import UsageError
from .files import atomic_open
from .model.config import ModelConfig


class RunConfigError(UsageError):
    """A bad run config: the message names the file and the dotted key."""


def check_registered(key: str, name, registry) -> None:
    """`name` must be one of the registry's names (a dict's keys or a tuple of names)."""
    if name not in registry:
        raise RunConfigError(f"{key}: unknown {name!r}; registered: {', '.join(registry)}")


# --------------------------------------------------------------------------- schema
@dataclasses.dataclass
class ModelSection:
    """Which model to train. `path` (HF or Orbax dir) wins over `preset`; neither -> error."""
    preset: Optional[str] = "tiny"
    path: Optional[str] = None
    param_dtype: str = "float32"  # master weights (and optimizer state)
    dtype: Optional[str] = None  # compute dtype (bfloat16 for real runs); None: keep the model's
    remat: Optional[str] = None
    attention: Optional[str] = None
    scan_layers: Optional[bool] = None
    attention_chunk: Optional[int] = None
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)  # other ModelConfig fields
    init_seed: int = 0  # random init when no path is given

    def runtime_fields(self) -> Dict[str, Any]:
        kw = {k: getattr(self, k) for k in ("dtype", "remat", "attention", "scan_layers",
                                            "attention_chunk") if getattr(self, k) is not None}
        kw["param_dtype"] = self.param_dtype
        return {**self.overrides, **kw}

    def validate(self) -> None:
        from .model.config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES
        check_registered("model.param_dtype", self.param_dtype, DTYPES)
        for key, registry in (("dtype", DTYPES), ("remat", REMAT_POLICIES),
                              ("attention", ATTENTION_IMPLS)):
            if getattr(self, key) is not None:
                check_registered(f"model.{key}", getattr(self, key), registry)

    def build(self) -> ModelConfig:
        """The ModelConfig for a preset (for `path`, the checkpoint's own config is read by the
        loader and `runtime_fields()` applied on top)."""
        if self.preset is None:
            raise RunConfigError("model: set model.preset or model.path")
        return ModelConfig.preset(self.preset, **self.runtime_fields())


@dataclasses.dataclass
class DataSection:
    train_files: List[str] = dataclasses.field(default_factory=list)
    schema: Optional[str] = None  # source adapter (chat, prompt_response, math, dpo, ...); None:
    # "chat" for SFT, "dpo" for DPO
    skip_bad_records: bool = False
    tokenizer: str = "char"  # "char" | "phi-4" | "phi-4-reasoning" | a HF tokenizer dir
    chat_format: str = "plain"
    seq_len: int = 512
    packed: bool = False
    shuffle: bool = True
    seed: int = 0
    epochs: Optional[int] = None  # None: repeat forever (train.steps bounds the run)
    length_policy: str = "drop"  # "drop" | "truncate" examples longer than seq_len
    workers: int = 0  # grain worker processes (0: in-process)
    # Synthetic verifiable math instead of files (tests, demo): {"n": 2000, "seed": 0, ...}
    synthetic: Optional[Dict[str, Any]] = None


@dataclasses.dataclass
class DPOSection:
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: str = "precompute"  # "precompute" (one pass, no resident ref model) | "params"


@dataclasses.dataclass
class PGSection:
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo | gspo
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0  # k3 KL coefficient (needs ref_logprobs in the batch when > 0)
    entropy_coef: float = 0.0
    # Dr. GRPO's constant L (seq-mean-token-sum-norm; default: the batch's padded length T)
    max_completion_length: Optional[int] = None
    # Loss aggregation (verl's loss_agg_mode names; PG_AGGREGATIONS in train/losses.py):
    # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm.
    # None (default): the loss_type's own - grpo, gspo: seq-mean-token-mean; dapo: token-mean;
    # dr_grpo: seq-mean-token-sum-norm. (trl's default loss_type is dapo, verl's default mode
    # token-mean.)
    loss_agg: Optional[str] = None
    # Truncated importance sampling against the sampler/trainer mismatch: weight each token's
    # surrogate by min(exp(old - sampler log-prob), tis_cap). Off by default (as in verl; trl's
    # vLLM correction is on by default, sequence-level, cap 3); needs the sampler's log-probs in
    # the batch (the RL loop adds them) and old log-probs recomputed by the trainer.
    tis: bool = False
    tis_cap: float = 2.0  # C (verl's rollout_is_threshold default 2.0)

    def validate(self, where: str = "train.pg") -> None:
        """The checks of this section (registry names and ranges); errors name the dotted key."""
        from .train.losses import PG_AGGREGATIONS, PG_LOSSES
        check_registered(f"{where}.loss_type", self.loss_type, PG_LOSSES)
        if self.loss_agg is not None:
            check_registered(f"{where}.loss_agg", self.loss_agg, PG_AGGREGATIONS)
        if self.tis_cap <= 0:
            raise RunConfigError(f"{where}.tis_cap: must be positive, got {self.tis_cap}")
        if self.max_completion_length is not None and self.max_completion_length <= 0:
            raise RunConfigError(f"{where}.max_completion_length: must be positive, "
                                 f"got {self.max_completion_length}")


@dataclasses.dataclass
class TrainSection:
    steps: Optional[int] = None  # optimizer updates; None: until the data runs out (needs epochs)
    batch_size: int = 8  # global: sequences (SFT, PG) or preference pairs (DPO) per update
    micro_batch_size: Optional[int] = None  # gradient accumulation; None: the whole batch
    loss: str = "ce"  # SFT loss name (SFT_LOSSES)
    # Positions of [*, V] logits computed at a time in the loss (0: all at once). With a 200k
    # vocabulary the full float32 logits dominate activation memory; chunks of 512-2048 keep
    # only one chunk's logits alive, forward and backward, for the same numbers.
    logits_chunk: int = 0
    lr: float = 1e-5
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0: fraction of the total steps
    min_lr_ratio: float = 0.0  # final lr / peak lr for cosine and linear
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0  # global-norm clip; None: off
    seed: int = 0
    on_nonfinite: str = "stop"  # "stop" (clear error naming the step) | "skip" (drop the update)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    pg: PGSection = dataclasses.field(default_factory=PGSection)

    @property
    def accumulation_steps(self) -> int:
        micro = self.micro_batch_size or self.batch_size
        return self.batch_size // micro

    def validate(self, where: str = "train") -> None:
        def bad(key, why):
            raise RunConfigError(f"{where}.{key}: {why}")

        if self.batch_size <= 0:
            bad("batch_size", f"must be positive, got {self.batch_size}")
        micro = self.micro_batch_size or self.batch_size
        if micro <= 0 or self.batch_size % micro:
            bad("micro_batch_size", f"{micro} must be positive and divide batch_size "
                f"{self.batch_size}")
        if self.steps is not None and self.steps <= 0:
            bad("steps", f"must be positive, got {self.steps}")
        if self.logits_chunk < 0:
            bad("logits_chunk", f"must be >= 0 (0: no chunking), got {self.logits_chunk}")
        from .train.losses import DPO_LOSSES, SFT_LOSSES
        from .train.optim import LR_SCHEDULES
        for key, name, registry in (("loss", self.loss, SFT_LOSSES),
                                    ("schedule", self.schedule, LR_SCHEDULES),
                                    ("dpo.loss_type", self.dpo.loss_type, DPO_LOSSES)):
            check_registered(f"{where}.{key}", name, registry)
        self.pg.validate(f"{where}.pg")
        if self.on_nonfinite not in ("stop", "skip"):
            bad("on_nonfinite", f"must be stop or skip, got {self.on_nonfinite!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.dpo.reference not in ("precompute", "params"):
            bad("dpo.reference", f"must be precompute or params, got {self.dpo.reference!r}")
        if not 0.0 <= self.dpo.label_smoothing < 0.5:
            bad("dpo.label_smoothing", f"must be in [0, 0.5), got {self.dpo.label_smoothing}")


@dataclasses.dataclass
class MeshSection:
    enabled: bool = False  # False: single device, no explicit shardings
    data: int = 1
    fsdp: int = -1  # -1: all remaining devices
    tensor: int = 1
    dcn_data: int = 1  # multi-slice / multi-host: data-parallel replicas across slices (DCN)
    dcn_fsdp: int = 1  # FSDP sharding across slices (DCN)


@dataclasses.dataclass
class OutputSection:
    dir: str = "./runs/run"
    save_every: int = 500  # steps between checkpoints (also saved at the end and on SIGTERM)
    keep: int = 3  # checkpoints kept
    async_checkpoint: bool = True
    log_every: int = 1  # steps between progress-bar / JSONL / TensorBoard records
    tensorboard: bool = True
    progress: bool = True
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU (None: from device kind)


@dataclasses.dataclass
class TargetSection:
    """The hardware a config is sized for: `phi-reason plan CONFIG.yaml` plans every program of
    the stage on it (the run itself uses whatever devices it is given)."""
    accelerator: Optional[str] = None  # a name in phi_reason.hardware.ACCELERATORS (h100, v5p...)
    devices: Optional[int] = None  # devices in the job (all hosts); sizes the mesh's -1 axis


@dataclasses.dataclass
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)
    target: TargetSection = dataclasses.field(default_factory=TargetSection)


# --------------------------------------------------------------------------- loading
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str, where: str):
    """Check/convert one YAML value against a field type; errors name the key."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RunConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return _build(tp, value, key, where)
    if tp is Any:
        return value
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise RunConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise RunConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")


# Keys that existed once: an old config is told what replaced them.
REMOVED_KEYS = {
    "rl.reference_on_host": "the frozen reference now lives on the devices, sharded like the "
                            "policy and in the compute dtype (no per-minibatch copy); delete it",
}


def _unknown_key(prefix: str, name: str, names, where: str) -> RunConfigError:
    """The error for `prefix.name`, suggesting the closest sibling key."""
    dotted = lambda n: f"{prefix}.{n}" if prefix else n  # noqa: E731
    if dotted(name) in REMOVED_KEYS:
        return RunConfigError(f"{where}: {dotted(name)!r} was removed: "
                              f"{REMOVED_KEYS[dotted(name)]}")
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    hint = (f"; did you mean {dotted(close[0])!r}?" if close
            else f"; valid keys: {', '.join(dotted(n) for n in names)}")
    return RunConfigError(f"{where}: unknown key {dotted(name)!r}{hint}")


def _build(cls, data: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kw = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise _unknown_key(prefix, str(k), names, where)
        kw[k] = _coerce(v, hints[k], key, where)
    return cls(**kw)


def _set_dotted(tree: dict, dotted: str, value, schema, where: str) -> None:
    parts = dotted.split(".")
    node, cls = tree, schema
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else None
        if fields is not None and part not in fields:
            raise _unknown_key(".".join(parts[:i]), part, list(fields), where)
        if i == len(parts) - 1:
            node[part] = value
            return
        tp = typing.get_type_hints(cls)[part] if cls is not None else None
        if typing.get_origin(tp) is typing.Union:
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        cls = tp if tp is not None and dataclasses.is_dataclass(tp) else None
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def parse_override(text: str):
    """`a.b.c=value` -> ("a.b.c", parsed YAML scalar)."""
    if "=" not in text:
        raise RunConfigError(f"override {text!r}: expected KEY=VALUE (e.g. train.lr=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RunConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RunConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key, value


def load_run_config(path: Optional[str] = None, overrides: Sequence[str] = (), schema=RunConfig):
    """Load `path` (YAML; None: defaults only), apply dotted overrides, validate against schema."""
    tree: dict = {}
    where = "<defaults>"
    if path is not None:
        where = os.fspath(path)
        if not os.path.exists(where):
            raise RunConfigError(f"{where}: config file not found")
        with open(where) as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise RunConfigError(f"{where}: not valid YAML ({e})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RunConfigError(
                f"{where}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    for text in overrides or ():
        key, value = parse_override(text)
        _set_dotted(tree, key, value, schema, f"{where} (override {text!r})")
    cfg = _build(schema, tree, "", where)
    try:
        if hasattr(cfg, "model"):
            cfg.model.validate()
        if hasattr(cfg, "train"):
            cfg.train.validate()
    except RunConfigError as e:
        raise RunConfigError(f"{where}: {e}") from None
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_run_config(cfg, path: str) -> None:
    """Write the resolved config (YAML) atomically: what exactly ran, next to its outputs."""
    with atomic_open(path) as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
