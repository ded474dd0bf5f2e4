"""phi-reason: JAX-native post-training for Microsoft's Phi-4 reasoning models.

The public API (documented in README): model config and parameters, the forward pass, checkpoints,
generation, tokenizers and chat formats, and the grader. Everything but the config is imported
lazily, so
`import phi_reason` (e.g. in grader worker processes) does not pull in JAX.
"""
from .model.config import ConfigError, ModelConfig

__version__ = "0.1.0"

_LAZY = {
    "forward": "phi_reason.model.decoder",
    "init_params": "phi_reason.model.params",
    "abstract_params": "phi_reason.model.params",
    "param_count": "phi_reason.model.params",
    "load_pretrained": "phi_reason.checkpoint",
    "save_pretrained": "phi_reason.checkpoint",
    "CheckpointError": "phi_reason.checkpoint",
    "generate": "phi_reason.engine.paged_sampler",
    "GenerateOutput": "phi_reason.engine.sampler",
    "load_tokenizer": "phi_reason.data.tokenizer",
    "CharTokenizer": "phi_reason.data.tokenizer",
    "Phi4Tokenizer": "phi_reason.data.tokenizer",
    "render_conversation": "phi_reason.data.chat",
    "render_prompt": "phi_reason.data.chat",
    "stop_ids": "phi_reason.data.chat",
    "make_problems": "phi_reason.data.synthetic",
    "load_records": "phi_reason.data.sources",
    "sft_batches": "phi_reason.data.pipeline",
    "dpo_batches": "phi_reason.data.pipeline",
    "grade": "phi_reason.eval.grader",
    "grade_many": "phi_reason.eval.grader",
    "GraderPool": "phi_reason.eval.pool",
    "GradeResult": "phi_reason.eval.grader",
    "extract_answer": "phi_reason.eval.grader",
}

__all__ = ["ConfigError", "ModelConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'phi_reason' has no attribute {name!r}")
