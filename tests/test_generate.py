"""Generation semantics against the plain forward pass: logprobs, the LongRoPE regimes, stop tokens,
budgets, continuous batching (greedy and sampled) and seeds.

References are computed here with `forward` on whole sequences (no cache): the logits that chose
generated token i of a prompt of length P are forward(sequence[:P + i])[-1], evaluated with the
LongRoPE regime HF uses for that length (short when P + i <= original_max, long otherwise).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import TINY_SHAPES

from phi_reason.engine.paged_sampler import generate_paged
from phi_reason.engine.sampler import generate
from phi_reason.model.decoder import forward
from phi_reason.model.params import init_params

CFG = TINY_SHAPES["phi-4-mini-like"].replace(initializer_range=0.2)  # LongRoPE, original_max 64
OMAX = CFG.original_max_position_embeddings
REF_LEN = 128  # the reference forward runs on sequences padded to this length (one compile)
# The static sampler (the reference engine) and the paged engine, with blocks and chunks small
# enough that every row spans several of both.
ENGINES = {"static": generate,
           "paged": functools.partial(generate_paged, block_size=8, chunk_steps=8)}


@pytest.fixture(params=sorted(ENGINES))
def engine(request):
    return ENGINES[request.param]


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(11))


@functools.lru_cache(maxsize=None)
def _ref_fn():
    def fn(params, tokens, positions, segment_ids):
        return jax.nn.log_softmax(forward(params, tokens, CFG, positions, segment_ids), axis=-1)
    return jax.jit(fn)


def reference_logprobs(params, seq, n):
    """log_softmax(forward(seq[:n])) [n, V]; padding gets position 0 so that the LongRoPE regime is
    decided by the n real tokens only, exactly as for an unpadded forward."""
    tokens = np.zeros((1, REF_LEN), np.int32)
    positions = np.zeros((1, REF_LEN), np.int32)
    segments = np.zeros((1, REF_LEN), np.int32)
    tokens[0, :n], positions[0, :n], segments[0, :n] = seq[:n], np.arange(n), 1
    return np.asarray(_ref_fn()(params, tokens, positions, segments))[0, :n]


def expected_logprobs(params, prompt, generated):
    """Per generated token: the reference log-probabilities it was drawn from (regime per
    length)."""
    seq = list(prompt) + list(generated)
    short = reference_logprobs(params, seq, min(len(seq), OMAX))
    long = reference_logprobs(params, seq, len(seq)) if len(seq) > OMAX else None
    rows = []
    for i in range(len(generated)):
        n = len(prompt) + i  # tokens the model had seen
        rows.append(short[n - 1] if n <= OMAX else long[n - 1])
    return np.stack(rows)


PROMPT_LENGTHS = (40, 50, 60, 70)  # 40..60 + 30 cross original_max=64; 70 starts above it
NEW = 30


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("sampling,unroll", [(dict(), True),
                                             (dict(temperature=0.8, top_p=0.9, top_k=50), True),
                                             (dict(), False)],
                         ids=["greedy", "sampled", "greedy-scanned-layers"])
def test_logprobs_equal_forward_of_full_sequence(engine, params, prompts, sampling, unroll):
    """unroll=True: per-layer cache buffers (CPU default); False: the stacked cache under a
    `lax.scan` over layers (the accelerator default with scan_layers)."""
    out = engine(params, CFG, prompts, NEW, stop_tokens=(), seed=5, unroll_layers=unroll,
                   **sampling)
    for p, toks, lps, reason in zip(prompts, out.tokens, out.logprobs, out.finish_reasons):
        assert len(toks) == len(lps) == NEW and reason == "length"
        ref = expected_logprobs(params, p, toks)
        np.testing.assert_allclose(lps, ref[np.arange(NEW), toks], atol=1e-4, rtol=0)
        if not sampling:
            np.testing.assert_array_equal(toks, ref.argmax(-1))
        else:
            # the untempered logprob differs from the tempered one: make sure we return the former
            assert np.all(np.asarray(lps) <= 0)


@pytest.fixture(scope="module")
def batching_prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in (3, 14, 7, 30, 11, 25, 19)]


BUDGETS = (20, 5, 20, 12, 20, 1, 20)


@pytest.fixture(scope="module")
def stop_token(params, batching_prompts):
    """A token that greedy decoding emits early in some rows (so those rows stop) but not in all."""
    out = generate(params, CFG, batching_prompts, 20, stop_tokens=(), num_slots=2)
    firsts = {}
    for i, toks in enumerate(out.tokens):
        for t in toks[2:12]:
            firsts.setdefault(t, set()).add(i)
    candidates = [t for t, rows in firsts.items() if 1 <= len(rows) < len(out.tokens) - 1]
    assert candidates, "no token occurs in only some rows"
    return candidates[0]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, top_k=20)],
                         ids=["greedy", "sampled"])
def test_continuous_batching_matches_one_at_a_time(engine, params, batching_prompts, stop_token,
                                                   sampling):
    kw = dict(stop_tokens=(stop_token,), seed=3, **sampling)
    batched = engine(params, CFG, batching_prompts, BUDGETS, num_slots=2, **kw)
    if sampling:
        # One slot: the prompts run strictly one after another. Sampling keys derive from
        # (seed, prompt index, token index), so the same call with one slot must agree.
        alone = engine(params, CFG, batching_prompts, BUDGETS, num_slots=1, **kw)
        singles = list(zip(alone.tokens, alone.logprobs, alone.finish_reasons))
    else:  # greedy: one call per prompt
        singles = []
        for p, budget in zip(batching_prompts, BUDGETS):
            one = engine(params, CFG, [p], budget, num_slots=1, **kw)
            singles.append((one.tokens[0], one.logprobs[0], one.finish_reasons[0]))
    for i, (toks, lps, reason) in enumerate(singles):
        assert batched.tokens[i] == toks, f"prompt {i}"
        np.testing.assert_allclose(batched.logprobs[i], lps, atol=1e-5)
        assert batched.finish_reasons[i] == reason
    reasons = batched.finish_reasons
    for toks, reason, budget in zip(batched.tokens, reasons, BUDGETS):
        if reason == "stop":
            assert toks[-1] == stop_token and stop_token not in toks[:-1]
        else:
            assert len(toks) == budget and stop_token not in toks
    if not sampling:
        assert "stop" in reasons and "length" in reasons


def test_same_seed_same_output_other_seed_differs(engine, params, batching_prompts):
    kw = dict(temperature=1.0, top_k=20, stop_tokens=(), num_slots=2)
    a = engine(params, CFG, batching_prompts, BUDGETS, seed=3, **kw)
    b = engine(params, CFG, batching_prompts, BUDGETS, seed=3, **kw)
    c = engine(params, CFG, batching_prompts, BUDGETS, seed=4, **kw)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens


def test_total_length_capped_at_max_positions(engine, params):
    cfg = CFG.replace(max_position_embeddings=80)
    prompt = list(range(1, 71))
    out = engine(params, cfg, [prompt], 30, stop_tokens=())
    assert len(out.tokens[0]) == 10 and out.finish_reasons == ["length"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 2], [3, 999]]), "prompt 1 has token id 999"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(max_new_tokens=[3, 4]), "2 entries for 1 prompts"),
    (dict(max_new_tokens=0), "must be >= 1"),
])
def test_bad_arguments_are_named(engine, params, kwargs, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        engine(params, CFG, **args)


@pytest.mark.parametrize("position, regime", [(OMAX - 2, False), (OMAX + 5, True)])
def test_decode_step_without_regime_decides_from_positions(params, position, regime):
    """use_long=None: the LongRoPE regime follows the positions as in HF's forward (short while
    max position + 1 <= original_max); it must not be read as a bool array (an error in jax
    0.11)."""
    from phi_reason.model.kv_cache import decode_step, init_cache

    cache = init_cache(CFG, 2, OMAX + 8)
    cache = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.key(3), x.shape, x.dtype), cache)
    tokens, pos = jnp.array([5, 9]), jnp.full((2,), position)
    step = jax.jit(decode_step, static_argnums=1)
    got, _ = step(params, CFG, cache, tokens, pos, None)
    want, _ = step(params, CFG, cache, tokens, pos, jnp.full((2,), regime))
    other, _ = step(params, CFG, cache, tokens, pos, jnp.full((2,), not regime))
    # Two programs (regime traced vs passed in): identical rope tables, but XLA may fuse the rest
    # differently; 1e-5 is ~20 ulp of |logits| <= 6.3, while the other regime is off by >= 4.7.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    assert not np.allclose(np.asarray(got), np.asarray(other))
