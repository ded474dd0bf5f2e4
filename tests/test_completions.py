"""The jobs' one sample -> text -> grade path (jobs/completions.py) and the engine sizing it relies
on: rows and pool derived from a memory budget (hand-computed), progress reports, the decode
layout of the inference weights, and the eval/generate mesh flag."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_reason.data.tokenizer import completion_text, load_tokenizer
from phi_reason.engine import paged_sampler
from phi_reason.engine.paged_sampler import MAX_ROWS, generate_paged, pool_plan
from phi_reason.engine.scheduler import kv_bytes_per_block
from phi_reason.jobs.build import job_mesh
from phi_reason.jobs.completions import ProgressBar, grade, sample
from phi_reason.model.config import ModelConfig
from phi_reason.model.params import init_params

CFG = ModelConfig.preset("tiny", initializer_range=0.2, vocab_size=264)  # = char tokenizer


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def test_pool_plan_by_hand():
    bs, chunk = 16, 32
    per_block = 2 * CFG.num_hidden_layers * CFG.num_key_value_heads * bs * CFG.head_dim * 4
    assert kv_bytes_per_block(CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim, bs,
                              4) == per_block
    # Plenty of memory: every row at its full length, a power of two of blocks, rows = all.
    rows, blocks = pool_plan(CFG, 10, 1, 100, 20, bs, chunk, jnp.float32, 1 << 40)
    assert (rows, blocks) == (10, 128)  # 10 rows x ceil(99 / 16) = 70 blocks + scratch -> 128
    # More rows than MAX_ROWS: capped.
    assert pool_plan(CFG, 1000, 1, 100, 20, bs, chunk, jnp.float32, 1 << 40)[0] == MAX_ROWS
    # 40 blocks of memory: each row starts with ceil((20 + 32) / 16) = 4 blocks -> 39 // 4 rows.
    rows, blocks = pool_plan(CFG, 100, 1, 100, 20, bs, chunk, jnp.float32, 40 * per_block)
    assert (rows, blocks) == (9, 40)
    # Less than one full-length row: one row at full length plus scratch, whatever the budget.
    rows, blocks = pool_plan(CFG, 100, 1, 100, 20, bs, chunk, jnp.float32, 3 * per_block)
    assert (rows, blocks) == (2, 9)  # ceil(99/16) + 2 = 9 blocks; (9 - 1) // 4 = 2 rows
    # Four shards: rows and blocks are per shard; an explicit num_slots is kept.
    assert pool_plan(CFG, 100, 4, 100, 20, bs, chunk, jnp.float32, 40 * per_block) == (9, 40)
    assert pool_plan(CFG, 100, 4, 100, 20, bs, chunk, jnp.float32, 40 * per_block,
                     num_slots=64)[0] == 16


def test_a_small_budget_limits_rows_and_changes_no_output(params):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, int(rng.integers(4, 12))).tolist()
               for _ in range(8)]
    kw = dict(temperature=1.0, top_k=20, seed=5, stop_tokens=(), block_size=8, chunk_steps=8)
    free = generate_paged(params, CFG, prompts, 12, **kw)
    per_block = kv_bytes_per_block(CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim,
                                   8, 4)
    tight = generate_paged(params, CFG, prompts, 12, kv_bytes=8 * per_block, **kw)
    # 8 blocks; a row starts with ceil((median prompt + 8) / 8) blocks
    start = -(-(int(np.median([len(p) for p in prompts])) + 8) // 8)
    assert tight.stats["num_blocks"] == 8 and tight.stats["rows"] == 7 // start < 8
    assert free.stats["rows"] == 8
    assert tight.tokens == free.tokens and tight.finish_reasons == free.finish_reasons
    np.testing.assert_allclose(np.concatenate(tight.logprobs), np.concatenate(free.logprobs),
                               atol=1e-5)


def test_sample_texts_and_progress(params):
    tok = load_tokenizer("char")
    prompts = [tok.encode(t) for t in ("1+1=", "2+3=", "what is 7?")]
    stops = tuple(tok.eos_ids)
    seen = []
    out = sample(params, CFG, tok, prompts, stops, 10, temperature=1.0, seed=1,
                 on_progress=seen.append, chunk_steps=4)
    ref = generate_paged(params, CFG, prompts, 10, temperature=1.0, seed=1, stop_tokens=stops,
                         chunk_steps=4)
    assert out.tokens == ref.tokens
    assert out.texts == [completion_text(tok, t, stops) for t in ref.tokens]
    done = [p["rows_done"] for p in seen]
    assert done == sorted(done) and done[-1] == 3 and all(p["rows"] == 3 for p in seen)
    assert seen[-1]["tokens"] == sum(map(len, ref.tokens))

    class Grader:  # the pool's interface: submit -> future with .result().correct
        def submit(self, prediction, gold, mode):
            verdict = type("R", (), {"correct": prediction == gold})()
            return type("F", (), {"result": lambda self: verdict})()

    assert grade(Grader(), ["a", "b"], ["a", "c"], "eval") == [True, False]


def test_progress_bar_draws_rows_rate_and_eta(monkeypatch):
    import tqdm

    stream = io.StringIO()
    real = tqdm.tqdm
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **kw: real(*a, file=stream, mininterval=0, **kw))
    with ProgressBar("sampling") as bar:
        bar({"rows_done": 0, "rows": 8, "tokens": 0})
        bar({"rows_done": 3, "rows": 8, "tokens": 120})
        assert bar.bar.n == 3 and bar.bar.total == 8
        bar({"rows_done": 8, "rows": 8, "tokens": 400})
    text = stream.getvalue()
    assert "sampling" in text and "8/8" in text and "tok/s" in text and "<" in text  # ETA
    quiet = ProgressBar("off", enabled=False)
    quiet({"rows_done": 1, "rows": 2, "tokens": 3})
    assert quiet.bar is None


def test_inference_weights_loaded_for_decoding_are_not_copied(params):
    from phi_reason.model.sharded import param_shardings
    from phi_reason.sharding.mesh import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    placed = jax.device_put(params, param_shardings(CFG, mesh, paged_sampler.DECODE_RULES))
    assert paged_sampler.inference_params(placed, CFG, mesh) is placed
    trainer_layout = jax.device_put(params, param_shardings(CFG, mesh))
    moved = paged_sampler.inference_params(trainer_layout, CFG, mesh)
    assert moved is not trainer_layout
    assert moved["embed"].sharding.is_equivalent_to(placed["embed"].sharding, 2)


def test_job_mesh_from_the_flag():
    assert job_mesh(None) is None  # one process on CPU: one device
    mesh = job_mesh("data=2,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}  # fsdp: the rest
