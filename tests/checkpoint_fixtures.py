"""Tiny random Hugging Face checkpoints (written by transformers itself) for checkpoint tests."""
import numpy as np
import torch
import transformers
from safetensors import safe_open

from phi_reason.model.config import ModelConfig

# phi-4-like: untied head, full rotary, GQA 2. phi-4-mini-like: the "tiny" preset (tied embeddings,
# LongRoPE, partial rotary 0.75). initializer_range 0.1 so logits are far from trivially small.
FAMILIES = {
    "phi4": ModelConfig(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=1024, original_max_position_embeddings=1024,
                        rope_theta=250000.0, tie_word_embeddings=False, initializer_range=0.1,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "phi4mini": ModelConfig.preset("tiny", initializer_range=0.1, bos_token_id=1,
                                   eos_token_id=(2, 3), pad_token_id=1),
}


def make_hf_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg.to_hf()))
    return model.to(dtype).eval()


def hf_tensors(directory) -> dict:
    """name -> torch tensor for every tensor in every *.safetensors file of `directory`."""
    import glob
    out = {}
    for path in sorted(glob.glob(f"{directory}/*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                assert k not in out, k
                out[k] = f.get_tensor(k)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()
