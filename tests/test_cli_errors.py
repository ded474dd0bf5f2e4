"""Every command reports bad input the same way: one line on stderr naming the file / key / path,
no traceback, exit status 2 (argparse's own usage errors exit 2 as well)."""
import json
import pathlib

import pytest

from phi_reason import cli

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def files(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    rollout = tmp_path / "rollout.yaml"
    rollout.write_text("model: {preset: tiny}\nrollout: {samples_per_promt: 4}\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prediction": "1", "gold": "1"}\n{oops\n')
    return {"bench": str(bench), "rollout": str(rollout), "bad": str(bad_jsonl),
            "tmp": tmp_path}


CASES = {
    "eval": (lambda f: ["eval", "--model", "nope", "--benchmark", "math500", "--data", f["bench"],
                        "--out", str(f["tmp"] / "e")], "nope: checkpoint directory not found"),
    "eval-data": (lambda f: ["eval", "--model", "nope", "--benchmark", "math500", "--data",
                             str(f["tmp"] / "missing.jsonl")], "missing.jsonl does not exist"),
    "generate": (lambda f: ["generate", "--model", "nope", "--prompt", "hi"],
                 "nope: checkpoint directory not found"),
    "sft": (lambda f: ["sft", str(CONFIGS / "tiny_sft.yaml"), "train.lrr=1e-3"],
            "unknown key 'train.lrr'"),
    "dpo": (lambda f: ["dpo", str(CONFIGS / "tiny_dpo.yaml"), "data.seq_len=abc"], "data.seq_len"),
    "rl": (lambda f: ["rl", str(CONFIGS / "tiny_rl.yaml"), "rl.grup_size=4"],
           "unknown key 'rl.grup_size'"),
    "rl-file": (lambda f: ["rl", str(f["tmp"] / "nope.yaml")], "nope.yaml: config file not found"),
    "rollout-dpo": (lambda f: ["rollout-dpo", f["rollout"]],
                    "unknown key 'rollout.samples_per_promt'"),
    "convert": (lambda f: ["convert", "hf-to-orbax", str(f["tmp"] / "nohf"), str(f["tmp"] / "o")],
                "nohf"),
    "plan": (lambda f: ["plan", "--model", "phi-5"], "phi-5"),
    "grade": (lambda f: ["grade", "--input", f["bad"]], "bad.jsonl:2"),
    "decontaminate": (lambda f: ["decontaminate", "--train", str(f["tmp"] / "none.jsonl"),
                                 "--eval", f["bench"], "--out", str(f["tmp"] / "d.jsonl")],
                      "none.jsonl"),
    "demo": (lambda f: ["demo", "--config", str(f["tmp"] / "nodemo.yaml"), "--out",
                        str(f["tmp"] / "demo")], "nodemo.yaml"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_usage_errors_are_one_line_and_exit_2(case, files, capsys):
    argv, expected = CASES[case]
    rc = cli.main(argv(files))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "phi-4", "--accelerator", "tpu-v9"])
    assert e.value.code == 2 and "invalid choice: 'tpu-v9'" in capsys.readouterr().err
