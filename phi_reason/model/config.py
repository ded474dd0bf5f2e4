"""ModelConfig: the Phi-3 architecture (as used by all Phi-4 models) plus runtime choices.

Architecture fields mirror transformers' `Phi3Config`; runtime fields (dtypes, remat, attention
path, scan) never go to `to_hf`. Validation happens at construction and names the bad field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Tuple

from ..errors import UsageError

PHI4_MINI_LONG_FACTOR = (
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
)

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_attn", "save_attn_out", "save_qkv_proj")
ATTENTION_IMPLS = ("auto", "reference", "chunked", "causal_blocked", "cpu_flash", "gpu", "tpu")
DTYPES = ("float32", "bfloat16", "float16")
_LONGROPE_ALIASES = ("longrope", "su", "yarn")
# ModelConfig field -> its key in a HF rope_scaling / rope_parameters dict
_LONGROPE_FIELDS = {"rope_short_factor": "short_factor", "rope_long_factor": "long_factor",
                    "rope_factor": "factor", "rope_attention_factor": "attention_factor"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ConfigError(UsageError):
    """A bad model config value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- architecture (Phi3Config) ---
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling_type: Optional[str] = None  # None or "longrope"
    rope_short_factor: Optional[Tuple[float, ...]] = None
    rope_long_factor: Optional[Tuple[float, ...]] = None
    # LongRoPE only; None derives them from max/original position embeddings, as transformers does
    rope_factor: Optional[float] = None
    rope_attention_factor: Optional[float] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None  # int or tuple of ints
    pad_token_id: Optional[int] = None
    initializer_range: float = 0.02
    # --- runtime (never written to HF config) ---
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; softmax and norm statistics stay float32
    remat: str = "none"
    attention: str = "auto"
    # False unrolls the layers: less loop overhead for small models, but XLA CPU then keeps
    # every layer's activations whatever `remat` says (benchmarks/results/train_step_cpu.md)
    scan_layers: bool = True
    attention_chunk: int = 512  # block size of the chunked path

    def __post_init__(self):
        def bad(field, why):
            raise ConfigError(f"ModelConfig.{field}: {why}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                  "attention_chunk"):
            v = getattr(self, f)
            if not _is_int(v) or v <= 0:
                bad(f, f"must be a positive integer, got {v!r}")
        # Only LongRoPE reads it (transformers writes 4096 whatever the model), so its value is
        # checked below only when LongRoPE is in use.
        omax = self.original_max_position_embeddings
        if not _is_int(omax):
            bad("original_max_position_embeddings", f"must be an integer, got {omax!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                bad("num_attention_heads", f"{self.num_attention_heads} heads do not divide "
                    f"hidden_size {self.hidden_size} (set head_dim explicitly)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not _is_int(self.head_dim) or self.head_dim <= 0:
            bad("head_dim", f"must be a positive integer, got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_key_value_heads} must divide "
                f"num_attention_heads {self.num_attention_heads}")
        # As transformers: 0 rotates nothing, and an odd rotary_dim rotates one dim more (the
        # frequencies come in pairs); what is rotated must fit in the head.
        if self.partial_rotary_factor < 0 or 2 * math.ceil(self.rotary_dim / 2) > self.head_dim:
            bad("partial_rotary_factor", f"{self.partial_rotary_factor} gives rotary_dim "
                f"{self.rotary_dim}, which does not fit in head_dim {self.head_dim}")
        if self.rope_theta <= 0:
            bad("rope_theta", f"must be positive, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        if self.rope_scaling_type is not None:
            if self.rope_scaling_type not in _LONGROPE_ALIASES:
                bad("rope_scaling_type", f"only longrope (aliases su, yarn) is supported, "
                    f"got {self.rope_scaling_type!r}")
            object.__setattr__(self, "rope_scaling_type", "longrope")
            # transformers checks rotary_dim // 2 factors but an odd rotary_dim needs one more
            if self.rotary_dim % 2:
                bad("partial_rotary_factor",
                    f"rotary_dim {self.rotary_dim} must be even with longrope")
            for f in ("rope_short_factor", "rope_long_factor"):
                v = getattr(self, f)
                if v is None:
                    bad(f, "required when rope_scaling_type is longrope")
                if not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
                    bad(f, f"must be a list of numbers, got {v!r}")
                v = tuple(float(x) for x in v)
                object.__setattr__(self, f, v)
                if len(v) != self.rotary_dim // 2:
                    bad(f, f"has length {len(v)}, expected rotary_dim/2 = {self.rotary_dim // 2}")
                if 0.0 in v:  # an infinite frequency: NaN logits
                    bad(f, "factors must be nonzero")
            for f in ("rope_factor", "rope_attention_factor"):
                v = getattr(self, f)
                if v is not None and not _is_number(v):
                    bad(f, f"must be a number, got {v!r}")
            # omax may exceed max_position_embeddings: long factors then start past the max and
            # the attention factor stays 1, as in transformers
            if omax <= 0:
                bad("original_max_position_embeddings",
                    f"must be a positive integer with longrope, got {omax}")
        elif any(getattr(self, f) is not None for f in _LONGROPE_FIELDS):
            bad("rope_scaling_type", "rope factors given but rope_scaling_type is None")
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            bad("sliding_window", f"{self.sliding_window} < max_position_embeddings "
                f"{self.max_position_embeddings}: sliding-window attention is not implemented "
                "(Phi-4 models use full causal attention)")
        for f in ("param_dtype", "dtype"):
            if getattr(self, f) not in DTYPES:
                bad(f, f"must be one of {DTYPES}, got {getattr(self, f)!r}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_IMPLS:
            bad("attention", f"must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # --- derived ---
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attention_factor(self) -> float:
        """LongRoPE's cos/sin scale: rope_attention_factor if set, else
        sqrt(1 + ln(s)/ln(original_max)) with s = rope_factor, or max/original if that is unset."""
        if self.rope_scaling_type != "longrope":
            return 1.0
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)
        s = self.rope_factor
        if s is None:
            s = self.max_position_embeddings / self.original_max_position_embeddings
        if s <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))

    @property
    def stop_token_ids(self) -> Tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (tuple, list)) else (int(e),)

    def replace(self, **kw) -> "ModelConfig":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"ModelConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **kw)

    # --- presets ---
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # --- Hugging Face config.json ---
    @classmethod
    def from_hf(cls, source, **overrides) -> "ModelConfig":
        """Read a HF `config.json` (directory, file path, or already-parsed dict)."""
        where = "<dict>"
        if isinstance(source, Mapping):
            d = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            if not os.path.exists(path):
                raise ConfigError(f"{path}: config.json not found")
            try:
                with open(path) as f:
                    d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        mt = d.get("model_type")
        if mt is not None and mt != "phi3":
            raise ConfigError(f"{where}: model_type is {mt!r}; "
                              "phi-reason supports phi3 (Phi-4 family)")
        archs = d.get("architectures")
        if archs and "Phi3ForCausalLM" not in archs:
            raise ConfigError(f"{where}: architectures {archs} do not include Phi3ForCausalLM")
        # As transformers: a non-empty rope_scaling (older files) replaces rope_parameters; keys
        # missing from it come from the top level.
        scaling = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype in (None, "default"):
            rtype = None
        kw = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(scaling.get("rope_theta", d.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(scaling.get("partial_rotary_factor",
                                                    d.get("partial_rotary_factor", 1.0))),
            # transformers takes the top-level value (default 4096), even over one in rope_scaling
            original_max_position_embeddings=d.get("original_max_position_embeddings", 4096),
            rope_scaling_type=rtype,
            **{f: scaling.get(key) if rtype else None for f, key in _LONGROPE_FIELDS.items()},
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=d.get("sliding_window"),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            initializer_range=d.get("initializer_range", 0.02),
        )
        kw.update(overrides)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """A dict that `transformers.Phi3Config(**d)` accepts (both old and new transformers)."""
        d = {
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor,
            "rope_scaling": None, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "sliding_window": self.sliding_window,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
            "embd_pdrop": 0.0, "resid_pdrop": 0.0, "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "use_cache": True,
            "torch_dtype": self.param_dtype,
        }
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        if self.rope_scaling_type == "longrope":
            d["rope_scaling"] = {"type": "longrope", "short_factor": list(self.rope_short_factor),
                                 "long_factor": list(self.rope_long_factor)}
            for f in ("rope_factor", "rope_attention_factor"):
                if getattr(self, f) is not None:
                    d["rope_scaling"][_LONGROPE_FIELDS[f]] = getattr(self, f)
        return d

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls(**json.loads(text))


_PHI4 = dict(
    vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
    num_attention_heads=40, num_key_value_heads=10, head_dim=128,
    max_position_embeddings=16384, original_max_position_embeddings=16384, rope_theta=250000.0,
    partial_rotary_factor=1.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=100257, eos_token_id=100265, pad_token_id=100257,
)
_PHI4_MINI = dict(
    vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=24, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=131072, original_max_position_embeddings=4096, rope_theta=10000.0,
    partial_rotary_factor=0.75, rope_scaling_type="longrope",
    rope_short_factor=(1.0,) * 48, rope_long_factor=PHI4_MINI_LONG_FACTOR,
    rms_norm_eps=1e-5, tie_word_embeddings=True, sliding_window=262144,
    bos_token_id=199999, eos_token_id=(200020, 199999), pad_token_id=199999,
)
PRESETS = {
    "phi-4": _PHI4,
    "phi-4-reasoning": {**_PHI4, "max_position_embeddings": 32768,
                        "original_max_position_embeddings": 32768, "rope_theta": 500000.0,
                        "pad_token_id": 100349},
    "phi-4-mini": _PHI4_MINI,
    "phi-4-mini-reasoning": dict(_PHI4_MINI),
    # Tiny test/demo model: phi-4-mini's features (partial rotary, tied, LongRoPE, GQA 2) at toy
    # size.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=2048, original_max_position_embeddings=512, rope_theta=10000.0,
        partial_rotary_factor=0.75, rope_scaling_type="longrope",
        rope_short_factor=(1.0,) * 6, rope_long_factor=(1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
        tie_word_embeddings=True,
    ),
}
