"""Test helpers: random transformers Phi3 models and an explicit, test-local HF -> params mapping.

The mapping is written out by hand here (not taken from `param_specs`) so the parity tests check
the package's declarations against an independent reading of PHI4_FACTS section 2.
"""
import numpy as np
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from phi_reason import ModelConfig


def random_hf_model(cfg: ModelConfig, seed: int = 0) -> Phi3ForCausalLM:
    """A float32 Phi3ForCausalLM with non-trivial weights (norm weights randomised too)."""
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**cfg.to_hf())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def params_from_hf(model: Phi3ForCausalLM, cfg: ModelConfig) -> dict:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    H, nH, nKV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    FF, L = cfg.intermediate_size, cfg.num_hidden_layers
    q_rows, kv_rows = nH * hd, nKV * hd

    def stack(fn):
        return np.stack([fn(f"model.layers.{i}.") for i in range(L)])

    def qkv(p):
        return sd[p + "self_attn.qkv_proj.weight"]

    def gate_up(p):
        return sd[p + "mlp.gate_up_proj.weight"]

    params = {
        "embed": sd["model.embed_tokens.weight"],
        "final_norm": sd["model.norm.weight"],
        "layers": {
            "ln1": stack(lambda p: sd[p + "input_layernorm.weight"]),
            "ln2": stack(lambda p: sd[p + "post_attention_layernorm.weight"]),
            "wq": stack(lambda p: qkv(p)[:q_rows].reshape(nH, hd, H)),
            "wk": stack(lambda p: qkv(p)[q_rows:q_rows + kv_rows].reshape(nKV, hd, H)),
            "wv": stack(lambda p: qkv(p)[q_rows + kv_rows:].reshape(nKV, hd, H)),
            "wo": stack(lambda p: sd[p + "self_attn.o_proj.weight"].reshape(H, nH, hd)),
            "w_gate": stack(lambda p: gate_up(p)[:FF]),
            "w_up": stack(lambda p: gate_up(p)[FF:]),
            "w_down": stack(lambda p: sd[p + "mlp.down_proj.weight"]),
        },
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = sd["lm_head.weight"]
    return params


def hf_logits(model, tokens, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        kw = {}
        if position_ids is not None:
            kw["position_ids"] = torch.tensor(np.asarray(position_ids))
        return model(torch.tensor(np.asarray(tokens)), **kw).logits.float().numpy()


# Random tiny configs shaped like each preset (full vs partial rotary, tied vs untied, GQA 1/3/4,
# LongRoPE with a small original_max so sequences can sit below, at and above it).
TINY_SHAPES = {
    "phi-4-like": ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        original_max_position_embeddings=512, rope_theta=250000.0, tie_word_embeddings=False,
        initializer_range=0.1),
    "phi-4-reasoning-like-mha": ModelConfig(
        vocab_size=320, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, head_dim=12, max_position_embeddings=256,
        original_max_position_embeddings=256, rope_theta=500000.0, initializer_range=0.1),
    "phi-4-mini-like": ModelConfig(
        vocab_size=448, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        original_max_position_embeddings=64, rope_theta=10000.0, partial_rotary_factor=0.75,
        rope_scaling_type="longrope", rope_short_factor=(1.0, 1.0, 1.05, 1.1, 1.2, 1.3),
        rope_long_factor=(1.0, 1.5, 2.5, 4.0, 8.0, 16.0), tie_word_embeddings=True,
        initializer_range=0.1),
}
