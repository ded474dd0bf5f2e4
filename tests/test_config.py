"""Run configs: YAML + dotted overrides, strict keys with suggestions, types, paper values."""
import pathlib

import pytest

from phi_reason.config import RunConfig, RunConfigError, dump_run_config, load_run_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-5\n  batch_size: 16\n  dpo: {beta: 0.2}\n"
                 "data:\n  packed: true\n")
    cfg = load_run_config(path, ["train.lr=3e-4", "data.train_files=[a.jsonl, b.jsonl]",
                                 "train.micro_batch_size=4", "model.overrides.num_hidden_layers=1",
                                 "train.grad_clip=null"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 16 and cfg.train.accumulation_steps == 4
    assert cfg.train.dpo.beta == 0.2 and cfg.train.dpo.loss_type == "sigmoid"  # default kept
    assert cfg.data.packed is True and cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.model.overrides == {"num_hidden_layers": 1} and cfg.train.grad_clip is None
    assert cfg.model.build().num_hidden_layers == 1


@pytest.mark.parametrize("text,overrides,message", [
    ("train:\n  lrr: 1.0e-5\n", [], r"unknown key 'train.lrr'; did you mean 'train.lr'\?"),
    ("trian:\n  lr: 1.0e-5\n", [], r"unknown key 'trian'; did you mean 'train'\?"),
    ("", ["train.dpo.betaa=0.1"],
     r"unknown key 'train.dpo.betaa'; did you mean 'train.dpo.beta'\?"),
    ("", ["data.seqlen=128"], r"unknown key 'data.seqlen'; did you mean 'data.seq_len'\?"),
    ("", ["train.zzz=1"], r"unknown key 'train.zzz'; valid keys: train.steps"),
])
def test_unknown_keys_are_rejected_with_suggestion(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(RunConfigError, match=message) as e:
        load_run_config(path, overrides)
    assert path in str(e.value)


def test_a_removed_key_says_what_replaced_it(tmp_path):
    from phi_reason.jobs.rl_config import RLRunConfig
    path = write(tmp_path, "rl:\n  reference_on_host: true\n")
    with pytest.raises(RunConfigError, match=r"'rl.reference_on_host' was removed: the frozen "
                                             r"reference now lives on the devices"):
        load_run_config(path, schema=RLRunConfig)


def test_bad_values_name_the_key(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: many\n")
    with pytest.raises(RunConfigError, match=r"train.batch_size: expected int, got 'many'"):
        load_run_config(path)
    with pytest.raises(RunConfigError, match=r"data.packed: expected bool"):
        load_run_config(None, ["data.packed=3"])
    with pytest.raises(RunConfigError, match=r"micro_batch_size: 3 must .* divide batch_size 8"):
        load_run_config(None, ["train.batch_size=8", "train.micro_batch_size=3"])
    with pytest.raises(RunConfigError, match=r"train.schedule: unknown .exp.; registered: cosine"):
        load_run_config(None, ["train.schedule=exp"])
    with pytest.raises(RunConfigError, match=r"expected KEY=VALUE"):
        load_run_config(None, ["train.lr"])
    with pytest.raises(RunConfigError, match=r"config file not found"):
        load_run_config(str(tmp_path / "missing.yaml"))


def test_dump_round_trips(tmp_path):
    cfg = load_run_config(str(CONFIGS / "tiny_sft.yaml"), ["train.lr=0.5", "train.pg.beta=0.01"])
    out = tmp_path / "resolved.yaml"
    dump_run_config(cfg, str(out))
    assert load_run_config(str(out)) == cfg


def test_paper_configs_carry_the_paper_values():
    """PHI4_FACTS section 4."""
    r = load_run_config(str(CONFIGS / "phi4_reasoning_sft.yaml"))
    assert (r.train.steps, r.train.batch_size, r.train.lr, r.train.warmup_steps,
            r.train.weight_decay, r.data.seq_len) == (16000, 32, 1e-5, 450, 1e-4, 32768)
    assert r.data.chat_format == "phi-4-reasoning" and r.model.dtype == "bfloat16"
    mid = load_run_config(str(CONFIGS / "phi4_mini_reasoning_midtrain.yaml"))
    assert (mid.data.packed, mid.data.seq_len, mid.train.batch_size, mid.train.lr,
            mid.data.epochs, mid.train.warmup_ratio) == (True, 16384, 128, 1e-5, 5, 0.1)
    sft = load_run_config(str(CONFIGS / "phi4_mini_reasoning_sft.yaml"))
    assert (sft.data.packed, sft.data.seq_len, sft.train.batch_size, sft.train.lr) == (
        False, 20480, 128, 1e-5)
    dpo = load_run_config(str(CONFIGS / "phi4_mini_reasoning_dpo.yaml"))
    assert (dpo.data.seq_len, dpo.train.lr, dpo.data.epochs, dpo.train.dpo.reference) == (
        16384, 5e-7, 1, "precompute")
    # the stages chain: each starts from the previous stage's exported weights
    assert pathlib.Path(sft.model.path) == pathlib.Path(mid.output.dir) / "final"
    assert pathlib.Path(dpo.model.path) == pathlib.Path(sft.output.dir) / "final"
    for name in ("tiny_sft.yaml", "tiny_dpo.yaml"):
        load_run_config(str(CONFIGS / name))


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_cli_reports_config_errors_in_one_line(command, capsys):
    from phi_reason.cli import main
    rc = main([command, str(CONFIGS / f"tiny_{command}.yaml"), "train.lrr=1e-3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown key 'train.lrr'; did you mean 'train.lr'?" in err and "Traceback" not in err


@pytest.mark.parametrize("override, key, registered", [
    ("train.loss=xe", "train.loss", "ce"),
    ("train.schedule=step", "train.schedule", "cosine, linear, constant"),
    ("train.dpo.loss_type=kto", "train.dpo.loss_type", "sigmoid, ipo, hinge, robust"),
    ("train.pg.loss_type=ppo", "train.pg.loss_type", "grpo, dr_grpo, dapo, gspo"),
    ("model.remat=sometimes", "model.remat", "none, full, save_dots"),
    ("model.attention=flash9", "model.attention", "reference, chunked"),
    ("model.dtype=int8", "model.dtype", "float32, bfloat16"),
])
def test_unknown_registered_names_fail_at_load_listing_the_registry(override, key, registered):
    with pytest.raises(RunConfigError, match=f"{key}: unknown .*; registered: .*{registered}"):
        load_run_config(str(CONFIGS / "tiny_sft.yaml"), [override])
