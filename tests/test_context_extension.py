"""Context extension on a checkpoint (Phi-4 -> Phi-4-reasoning: RoPE theta 500K, 32K positions):
the context fields may override a checkpoint's config, architecture fields may not, and rows
longer than the model's positions are refused before training."""
import jax
import numpy as np
import pytest

from phi_reason.checkpoint import save_pretrained
from phi_reason.config import RunConfigError, load_run_config
from phi_reason.jobs import build
from phi_reason.model.config import ModelConfig
from phi_reason.model.params import init_params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = ModelConfig.preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    out = str(tmp_path_factory.mktemp("ckpt") / "hf")
    save_pretrained(cfg, params, out, format="hf")
    return out, cfg, params


def test_context_fields_override_a_checkpoint(checkpoint):
    path, cfg, params = checkpoint
    run = load_run_config(None, [f"model.path={path}", "model.overrides={rope_theta: 500000, "
                                 "max_position_embeddings: 4096}"])
    got, loaded = build.build_model(run)
    assert got.rope_theta == 500000 and got.max_position_embeddings == 4096
    assert cfg.rope_theta != 500000 and cfg.max_position_embeddings == 2048
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same weights


def test_architecture_fields_are_refused_on_a_checkpoint(checkpoint):
    run = load_run_config(None, [f"model.path={checkpoint[0]}",
                                 "model.overrides={num_hidden_layers: 1}"])
    with pytest.raises(RunConfigError, match=r"\['num_hidden_layers'\] change the architecture"):
        build.build_model(run)


def test_rows_longer_than_the_positions_are_refused():
    cfg = ModelConfig.preset("tiny")
    build.check_context(cfg, 2048)
    with pytest.raises(RunConfigError, match=r"data.seq_len 4096 exceeds the model's "
                                             r"max_position_embeddings 2048"):
        build.check_context(cfg, 4096)
