"""The paged engine beyond `generate`'s semantics (tests/test_generate*.py run it against the
static sampler, `forward` and transformers): prefix sharing, preemption, what a decode chunk is
given (rows and table width follow live work, not capacity), compilations across an RL-like
sequence of calls, and the decode layout of the weights on a mesh.
"""
import collections
import re

import jax
import numpy as np
import pytest
from hf_reference import TINY_SHAPES

from phi_reason.engine import paged_sampler
from phi_reason.engine.paged import decode_chunk, prefill_blocks
from phi_reason.engine.paged_sampler import generate_paged
from phi_reason.engine.sampler import GenerationInterrupted, generate
from phi_reason.model.params import init_params

CFG = TINY_SHAPES["phi-4-mini-like"].replace(initializer_range=0.2)  # LongRoPE, original_max 64
SAMPLED = dict(temperature=1.0, top_k=20, seed=3, stop_tokens=())


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(11))


@pytest.fixture(scope="module")
def groups():
    """GRPO-like rows: 3 prompts x 4 samples (prompt lengths with and without a partial block)."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (9, 17, 30)]
    return [p for p in prompts for _ in range(4)]


@pytest.fixture
def chunks(monkeypatch):
    """Every decode_chunk call's (rows, table width) as the engine made it."""
    seen = []

    def spy(*args, **kw):
        seen.append(args[10].shape)  # table [D, R, W]
        return decode_chunk(*args, **kw)

    monkeypatch.setattr(paged_sampler, "decode_chunk", spy)
    return seen


def test_prefix_sharing_prefills_each_prompt_once_and_changes_no_output(params, groups):
    kw = dict(block_size=8, chunk_steps=8, num_slots=12, **SAMPLED)
    shared = generate_paged(params, CFG, groups, 12, **kw)
    alone = generate_paged(params, CFG, groups, 12, share_prefix=False, **kw)
    assert shared.tokens == alone.tokens
    for a, b in zip(shared.logprobs, alone.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # cached prompt positions = length - 1 (the last prompt token is decoded): once per prompt
    assert shared.stats["prefill_tokens"] == 8 + 16 + 29
    assert alone.stats["prefill_tokens"] == 4 * (8 + 16 + 29)
    assert shared.stats["forked"] == 12
    reference = generate(params, CFG, groups, 12, num_slots=12, **SAMPLED)
    assert shared.tokens == reference.tokens


def test_a_small_pool_preempts_and_recomputes_without_changing_output(params, groups):
    kw = dict(block_size=4, chunk_steps=4, num_slots=6, **SAMPLED)
    roomy = generate_paged(params, CFG, groups, 40, **kw)
    tight = generate_paged(params, CFG, groups, 40, kv_blocks=40, **kw)
    assert tight.stats["preemptions"] > 0 and roomy.stats.get("preemptions", 0) == 0
    assert tight.stats["peak_used_blocks"] <= 39 < roomy.stats["peak_used_blocks"]
    assert tight.tokens == roomy.tokens
    for a, b in zip(tight.logprobs, roomy.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_prefill_calls_are_capped_in_tokens_and_change_no_output(params, groups, monkeypatch):
    """With PREFILL_TOKENS = 32, twelve unshared prompts of 9-30 tokens go in calls of at most
    32 tokens per shard (buckets of 16 and 32 tokens: 2 rows and 1 row per call)."""
    kw = dict(block_size=8, chunk_steps=8, num_slots=12, share_prefix=False, **SAMPLED)
    whole = generate_paged(params, CFG, groups, 8, **kw)
    shapes = []

    def spy(*args, **kw):
        shapes.append(args[2].shape)  # tokens [D, n, T]
        return prefill_blocks(*args, **kw)

    monkeypatch.setattr(paged_sampler, "PREFILL_TOKENS", 32)
    monkeypatch.setattr(paged_sampler, "prefill_blocks", spy)
    capped = generate_paged(params, CFG, groups, 8, **kw)
    assert shapes and all(n * t <= 32 for _, n, t in shapes), shapes
    assert sum(n for _, n, _ in shapes) >= len(groups)
    assert capped.tokens == whole.tokens
    for a, b in zip(capped.logprobs, whole.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_table_width_follows_live_tokens_not_capacity(params, chunks):
    """Two rows whose budget allows the whole context: each chunk's table covers only the
    blocks the rows hold by the chunk's end."""
    prompts = [[5] * 10, [7] * 12]
    with pytest.raises(GenerationInterrupted):
        generate_paged(params, CFG, prompts, CFG.max_position_embeddings - 12, block_size=8,
                       chunk_steps=8, stop_tokens=(), interrupt=lambda: len(chunks) >= 3,
                       interrupt_every=8)
    # cached by the end of chunk c: 11 + 8c positions -> blocks of 8: 3, 4, 5 -> widths 4, 4, 8
    assert [w for _, _, w in chunks] == [4, 4, 8]
    assert CFG.max_position_embeddings // 8 > 8  # the capacity would need far more


def test_finished_rows_leave_the_batch(params, chunks):
    """Seven short rows and one long one: once the short rows end, chunks run one row."""
    prompts = [[3 + i] * 6 for i in range(8)]
    budgets = [4] * 7 + [60]
    generate_paged(params, CFG, prompts, budgets, block_size=8, chunk_steps=8, stop_tokens=())
    rows = [r for _, r, _ in chunks]
    assert rows[0] == 8 and rows[-1] == 1 and rows.count(1) >= 6


def test_an_rl_like_sequence_of_calls_compiles_once_per_bucket(params, monkeypatch):
    """RL-like calls: rounds of different sizes and budgets (dynamic sampling) with fresh random
    prompt lengths, then greedy evaluation; twice. Each device function compiles once per shape
    bucket it is called with, and the second pass (new lengths, same ranges) reuses them."""
    rng = np.random.default_rng(4)
    signatures = {"decode": set(), "prefill": set()}

    def spy_decode(*args, **kw):
        signatures["decode"].add((args[1].k[0].shape, args[10].shape, kw["sp"]))  # pool, table
        return decode_chunk(*args, **kw)

    def spy_prefill(*args, **kw):
        signatures["prefill"].add((args[1].k[0].shape, args[2].shape))  # pool, tokens
        return prefill_blocks(*args, **kw)

    monkeypatch.setattr(paged_sampler, "decode_chunk", spy_decode)
    monkeypatch.setattr(paged_sampler, "prefill_blocks", spy_prefill)

    def one_pass():
        for n_prompts, budget, temp in ((4, 20, 1.0), (2, 20, 1.0), (3, 12, 1.0), (4, 20, 0.0)):
            prompts = [rng.integers(0, CFG.vocab_size, int(rng.integers(5, 30))).tolist()
                       for _ in range(n_prompts)]
            generate_paged(params, CFG, [p for p in prompts for _ in range(4)], budget,
                           temperature=temp, num_slots=16, block_size=8, chunk_steps=8,
                           stop_tokens=())

    def compiled():
        return decode_chunk._cache_size(), prefill_blocks._cache_size()

    # Earlier tests in this process may have compiled some of these buckets already.
    decode_chunk.clear_cache()
    prefill_blocks.clear_cache()
    start = compiled()
    one_pass()
    first = compiled()
    seen = {k: len(v) for k, v in signatures.items()}
    one_pass()
    second = compiled()
    assert second[0] - start[0] == len(signatures["decode"])  # once per bucket
    assert second[1] - start[1] == len(signatures["prefill"])
    new_buckets = (len(signatures["decode"]) - seen["decode"]
                   + len(signatures["prefill"]) - seen["prefill"])
    assert second[0] + second[1] - first[0] - first[1] == new_buckets <= 2, signatures


def _collectives(text: str):
    """(op, element count) of every collective in compiled HLO text."""
    out = []
    for line in text.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|reduce-scatter|"
                      r"all-to-all|collective-permute)(-start)?\(", line)
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            out.append((m.group(3), int(np.prod(dims)) if dims else 1))
    return out


def test_decode_loop_on_an_fsdp_mesh_moves_no_weights(params, monkeypatch):
    """Trainer-laid-out (FSDP-sharded) weights go in; the compiled decode chunk must not gather
    them (nor reduce weight-sized partial products) at every token."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 virtual CPU devices)")
    from phi_reason.model.sharded import param_shardings
    from phi_reason.sharding.mesh import make_mesh

    mesh = make_mesh(fsdp=8)
    trainer_params = jax.device_put(params, param_shardings(CFG, mesh))
    seen = {}

    def spy(*args, **kw):
        seen["args"], seen["kw"] = args, kw
        return decode_chunk(*args, **kw)

    monkeypatch.setattr(paged_sampler, "decode_chunk", spy)
    generate_paged(trainer_params, CFG, [[5] * 20] * 8, 4, mesh=mesh, stop_tokens=())
    hlo = decode_chunk.lower(*seen["args"], **seen["kw"]).compile().as_text()
    big = [c for c in _collectives(hlo) if c[1] >= CFG.hidden_size]
    assert not big, collections.Counter(big)
