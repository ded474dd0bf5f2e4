"""First-fit packing and padded rows (pure functions): invariants on random examples and the row
assignment against a plain-Python first-fit reference written here."""
import numpy as np
import pytest

from phi_reason.data.chat import render_conversation
from phi_reason.data.packing import FirstFitBins, apply_length_policy, pack_first_fit, pad_rows
from phi_reason.data.tokenizer import CharTokenizer

PAD = 0


def _random_examples(rng, n, max_len):
    """Examples whose first tokens are a 'prompt' (mask 0) and the rest a 'response' (mask 1)."""
    out = []
    for i in range(n):
        length = int(rng.integers(1, max_len + 1))
        prompt = int(rng.integers(0, length))
        tokens = rng.integers(1, 500, size=length).astype(np.int32)
        tokens[0] = 1000 + i  # unique first token identifies the example
        loss_mask = np.r_[np.zeros(prompt), np.ones(length - prompt)].astype(np.int32)
        out.append({"tokens": tokens, "loss_mask": loss_mask})
    return out


def _reference_first_fit(lengths, rows, seq_len):
    """[(batch, row)] per example: each goes to the first row with room; when none has room, a new
    batch starts with it."""
    placement, fill, batch = [], [0] * rows, 0
    for length in lengths:
        row = next((r for r in range(rows) if fill[r] + length <= seq_len), None)
        if row is None:
            batch, fill = batch + 1, [0] * rows
            row = 0
        fill[row] += length
        placement.append((batch, row))
    return placement


def _segments(batches):
    """{first token: (batch, row, tokens, mask, positions)} for every packed segment."""
    found = {}
    for b, batch in enumerate(batches):
        for r in range(batch["tokens"].shape[0]):
            seg = batch["segment_ids"][r]
            ids = seg[seg > 0]
            assert np.all(np.diff(ids) >= 0), "segments must be contiguous and in order"
            if ids.size:
                assert list(np.unique(ids)) == list(range(1, ids.max() + 1)), "segment ids 1..n"
            # padding only after the last segment
            assert np.all(seg[len(ids):] == 0)
            for s in np.unique(ids):
                where = np.flatnonzero(seg == s)
                assert np.all(np.diff(where) == 1), "a segment is one contiguous span"
                tok = batch["tokens"][r, where]
                found[int(tok[0])] = (b, r, tok, batch["loss_mask"][r, where],
                                      batch["positions"][r, where])
    return found


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_fit_invariants(seed):
    rng = np.random.default_rng(seed)
    rows, seq_len = 4, 64
    examples = _random_examples(rng, 120, 40)
    batches = pack_first_fit(examples, rows, seq_len, PAD)
    found = _segments(batches)
    assert len(found) == len(examples)  # nothing lost, nothing split: one segment per example
    for i, ex in enumerate(examples):
        b, r, tok, mask, pos = found[1000 + i]
        np.testing.assert_array_equal(tok, ex["tokens"])
        np.testing.assert_array_equal(mask, ex["loss_mask"])  # never on prompt tokens
        np.testing.assert_array_equal(pos, np.arange(len(tok)))  # positions restart per segment
    tokens_in = sum(len(e["tokens"]) for e in examples)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == tokens_in
    for batch in batches:
        pad = batch["segment_ids"] == 0
        assert np.all(batch["loss_mask"][pad] == 0) and np.all(batch["tokens"][pad] == PAD)
        assert np.all(batch["positions"][pad] == 0)
        assert all(batch[k].shape == (rows, seq_len) and batch[k].dtype == np.int32 for k in batch)
    reference = _reference_first_fit([len(e["tokens"]) for e in examples], rows, seq_len)
    assert [found[1000 + i][:2] for i in range(len(examples))] == reference


def test_bins_refuse_without_side_effects():
    bins = FirstFitBins(rows=2, seq_len=5, pad_id=PAD)
    ex = lambda n, t: {"tokens": np.full(n, t, np.int32), "loss_mask": np.ones(n, np.int32)}  # noqa: E731
    assert bins.add(ex(3, 7)) and bins.add(ex(4, 8)) and bins.add(ex(2, 9))
    before = {k: v.copy() for k, v in bins.batch.items()}
    assert not bins.add(ex(2, 5))  # rows hold 5 and 4 tokens: no room for 2
    assert all(np.array_equal(before[k], bins.batch[k]) for k in before)
    np.testing.assert_array_equal(bins.batch["tokens"], [[7, 7, 7, 9, 9], [8, 8, 8, 8, 0]])
    np.testing.assert_array_equal(bins.batch["segment_ids"], [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(bins.batch["positions"], [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    with pytest.raises(ValueError, match="exceeds seq_len 5"):
        bins.add(ex(6, 1))


def test_sft_rendered_examples_keep_prompt_unmasked():
    tok = CharTokenizer()
    examples = []
    for q, a in [("1+2=?", "3"), ("10+20=?", "30"), ("7*8=?", "56"), ("5-9=?", "-4")]:
        ids, mask = render_conversation([{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}],
                                        tok, "plain")
        examples.append({"tokens": np.array(ids, np.int32), "loss_mask": np.array(mask, np.int32)})
    (batch,) = pack_first_fit(examples, rows=2, seq_len=20, pad_id=tok.pad_id)
    for r in range(2):
        for s in np.unique(batch["segment_ids"][r][batch["segment_ids"][r] > 0]):
            where = batch["segment_ids"][r] == s
            text = tok.decode(batch["tokens"][r][where])
            trained = tok.decode(batch["tokens"][r][where & (batch["loss_mask"][r] == 1)])
            question, answer = text.split("\n")
            assert trained == answer  # the answer and its eos, never the question
            assert answer.endswith("<|endoftext|>")


def test_pad_rows():
    ex = [{"tokens": np.array([5, 6, 7], np.int32), "loss_mask": np.array([0, 1, 1], np.int32)},
          {"tokens": np.array([8], np.int32), "loss_mask": np.array([1], np.int32)}]
    batch = pad_rows(ex, rows=3, seq_len=4, pad_id=9)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 9], [8, 9, 9, 9], [9, 9, 9, 9]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="do not fit"):
        pad_rows(ex, rows=1, seq_len=4, pad_id=9)


def test_length_policy():
    ex = {"tokens": np.arange(10, dtype=np.int32), "loss_mask": np.ones(10, np.int32),
          "answer": "x"}
    same, event = apply_length_policy(ex, 10, "drop")
    assert same is ex and event is None
    cut, event = apply_length_policy(ex, 4, "truncate")
    assert (event == "truncated" and list(cut["tokens"]) == [0, 1, 2, 3]
            and len(cut["loss_mask"]) == 4)
    assert cut["answer"] == "x"
    assert apply_length_policy(ex, 4, "drop") == (None, "dropped")
    with pytest.raises(ValueError, match="'truncate' or 'drop'"):
        apply_length_policy(ex, 4, "split")
