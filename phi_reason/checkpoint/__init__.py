"""Checkpoints: Hugging Face safetensors <-> parameter pytree <-> Orbax (streaming, sharded)."""
from .api import detect_format, load_config, load_pretrained, save_pretrained
from .common import CheckpointError, parse_size
from .hf import HFCheckpoint, read_hf_config, read_hf_params, save_hf, write_hf
from .orbax_io import restore_orbax, save_orbax, save_params_orbax

__all__ = ["CheckpointError", "HFCheckpoint", "detect_format", "load_config", "load_pretrained",
           "parse_size", "read_hf_config", "read_hf_params", "restore_orbax", "save_hf",
           "save_orbax", "save_params_orbax", "save_pretrained", "write_hf"]
