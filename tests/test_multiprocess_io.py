"""Real multi-controller runs of the commands that sample, write files or convert (2 local
processes x 2 CPU devices, gloo) against one process x 4 devices: the same outputs, written once."""
import json
import pathlib

import numpy as np
import process_launcher
import pytest

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def test_rollout_dpo_two_processes_write_one_file_equal_to_one(tmp_path, cache):
    pairs = {}
    for n, devices in ((1, 4), (2, 2)):
        out = tmp_path / f"p{n}"
        process_launcher.run(["rollout-dpo", CONFIGS / "tiny_rollout_dpo.yaml", "mesh.enabled=true",
                              f"output.dir={out}", "rollout.max_prompts=6",
                              "rollout.samples_per_prompt=4", "rollout.prompts_per_chunk=4",
                              "rollout.max_new_tokens=16"], n, devices, cache)
        pairs[n] = (out / "pairs.jsonl").read_text()
        assert sorted(p.name for p in out.iterdir()) == ["pairs.jsonl", "pairs.jsonl.config.yaml"]
    assert pairs[2] == pairs[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random model as an Orbax checkpoint and as an HF dir (the byte tokenizer's ids)."""
    import jax

    from phi_reason import ModelConfig, init_params, save_pretrained
    root = tmp_path_factory.mktemp("ckpt")
    cfg = ModelConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(3))
    save_pretrained(cfg, params, str(root / "orbax"), format="orbax")
    save_pretrained(cfg, params, str(root / "hf"), format="hf")
    return root


def test_eval_and_generate_two_processes_write_once_equal_to_one(tmp_path, cache,
                                                                  tiny_checkpoint):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"{a}+{a}=", "answer": str(2 * a),
                                         "unique_id": str(a)}) + "\n" for a in range(5)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}*3="}) + "\n" for a in range(5)))
    common = ["--model", tiny_checkpoint / "orbax", "--tokenizer", "char", "--chat-format",
              "plain", "--max-new-tokens", "12", "--temperature", "0.9"]
    got = {}
    for n, devices in ((1, 4), (2, 2)):
        ev, gen = tmp_path / f"eval{n}", tmp_path / f"gen{n}.jsonl"
        process_launcher.run(["eval", *common, "--benchmark", "math500", "--data", bench,
                              "--samples", "2", "--out", ev], n, devices, cache)
        process_launcher.run(["generate", *common, "--prompts", prompts, "--output", gen],
                             n, devices, cache)
        got[n] = ((ev / "generations.jsonl").read_text(), gen.read_text())
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert got[2][0] == got[1][0]  # eval: same sampled texts, grades and files
    one, two = ([json.loads(x) for x in got[n][1].splitlines()] for n in (1, 2))
    assert len(got[1][0].splitlines()) == 10 and len(one) == 5
    for a, b in zip(one, two):  # generate: same ids; summed log-probs of another program
        assert (b["token_ids"], b["completion"]) == (a["token_ids"], a["completion"])
        np.testing.assert_allclose(b["logprob"], a["logprob"], rtol=1e-5)


def test_convert_two_processes_write_one_identical_checkpoint(tmp_path, cache, tiny_checkpoint):
    """HF -> Orbax -> HF as 2 processes: one output each way, bit-identical to the source (one
    process's round trip is tested bit for bit in test_checkpoint.py)."""
    from safetensors.numpy import load_file
    orbax, hf = tmp_path / "orbax", tmp_path / "hf"
    process_launcher.run(["convert", "hf-to-orbax", tiny_checkpoint / "hf", orbax], 2, 1, cache)
    process_launcher.run(["convert", "orbax-to-hf", orbax, hf], 2, 1, cache)
    got = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
    want = {k: v for f in (tiny_checkpoint / "hf").glob("*.safetensors")
            for k, v in load_file(f).items()}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "orbax"]


def test_plan_two_processes_print_once_what_one_prints(cache):
    args = ["plan", CONFIGS / "tiny_rl.yaml", "--devices", "4", "--json"]
    (_, one, _), = process_launcher.run(args, 1, 4, cache)
    (_, lead, _), (_, other, _) = process_launcher.run(args, 2, 2, cache)
    assert json.loads(lead) == json.loads(one) and other == ""
