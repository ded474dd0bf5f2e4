"""Greedy generation against transformers' `generate(do_sample=False)`, token for token.

Both families: phi-4-like (untied, full rotary) and phi-4-mini-like (tied, partial rotary 0.75,
LongRoPE with original_max 64). Prompts of different lengths run together in one of our calls
(fewer slots than prompts, so continuous batching refills slots), and one at a time in HF. The
phi-4-mini-like prompts cross the LongRoPE threshold during generation (50 + 64 and 9 + 64 tokens)
or start above it (70), exercising the re-prefill policy documented in generate/sampler.py.
"""
import numpy as np
import pytest
import torch
from hf_reference import TINY_SHAPES, params_from_hf, random_hf_model

from phi_reason.engine.paged_sampler import generate_paged
from phi_reason.engine.sampler import generate

NEW_TOKENS = 64
INIT = 0.2  # wide enough logits that greedy runs do not collapse into a short loop


def tiny(family):
    return TINY_SHAPES[family].replace(initializer_range=INIT)


def hf_greedy(model, prompt, max_new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family,lengths", [
    ("phi-4-like", (5, 12, 16, 30)),
    ("phi-4-mini-like", (50, 9, 70)),
])
def test_greedy_matches_transformers(family, lengths):
    """Both engines (the paged one every job uses, the static reference) against one HF run."""
    cfg = tiny(family)
    model = random_hf_model(cfg, seed=3)
    params = params_from_hf(model, cfg)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    refs = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    for run in (generate_paged, generate):
        ours = run(params, cfg, prompts, NEW_TOKENS, stop_tokens=(), num_slots=2)
        for p, ref, toks, reason in zip(prompts, refs, ours.tokens, ours.finish_reasons):
            assert len(set(ref[NEW_TOKENS // 2:])) > 8, \
                "degenerate reference: greedy tokens barely vary"
            assert toks == ref, f"{run.__name__}, prompt length {len(p)}: first mismatch at " \
                f"{next(i for i, (a, b) in enumerate(zip(toks, ref)) if a != b)}"
            assert reason == "length"
    if cfg.rope_scaling_type == "longrope":
        omax = cfg.original_max_position_embeddings
        assert any(len(p) <= omax < len(p) + NEW_TOKENS for p in prompts)  # crosses the threshold
        assert any(len(p) > omax for p in prompts)  # prefilled with long factors


def test_crossing_without_reprefill_would_differ():
    """The LongRoPE policy matters: HF's greedy tokens after the crossing differ from what a decode
    that keeps its short-factor cache would produce, so matching HF on the prompt of length 50
    above really checks the re-prefill policy."""
    cfg = tiny("phi-4-mini-like")
    model = random_hf_model(cfg, seed=3)
    prompt = np.random.default_rng(7).integers(0, cfg.vocab_size, 50).tolist()
    ref = hf_greedy(model, prompt, NEW_TOKENS)
    # Reference without the cache reset: re-run HF with the cache kept across the crossing.
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model(ids, use_cache=True)
        cache, toks = out.cache, []
        nxt = out.logits[0, -1].argmax()
        for i in range(NEW_TOKENS):
            toks.append(int(nxt))
            pos = torch.tensor([[len(prompt) + i]])
            out = model(nxt.view(1, 1), cache=cache, position_ids=pos, use_cache=True)
            cache, nxt = out.cache, out.logits[0, -1].argmax()
    crossing = cfg.original_max_position_embeddings + 1 - len(prompt)
    assert toks[:crossing] == ref[:crossing]
    assert toks != ref  # and test_greedy_matches_transformers matched `ref` for this prompt
