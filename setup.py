"""opera_jax: OPERA (perplexity-based reflective alignment) for Qwen3 in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Ranges cover jax 0.10.x (PyPI wheels for Python 3.11) and 0.11.x (the CUDA 13 GPU image).
JAX = "jax>=0.10.0,<0.12"

setup(
    name="opera_jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["opera_jax", "opera_jax.*"]),
    package_data={"opera_jax": ["assets/tiny_tokenizer/*"]},
    install_requires=[
        JAX,
        "flax>=0.12.0,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "transformers>=4.51.0",  # first release with Qwen3
        "jinja2>=3.1",  # transformers renders chat templates with it but does not require it
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "einops>=0.8",
        "ml_collections>=1.0",
        "grain>=0.2.10",
        "array-record>=0.8.1; sys_platform != 'win32'",  # as grain; data/records.py imports it
        "absl-py>=1.0",  # absl flags for the training CLI (opera_jax/train/cli.py)
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "cuda": ["jax[cuda13]>=0.10.0,<0.12"],
        "cuda12": ["jax[cuda12]>=0.10.0,<0.12"],
        # jax[tpu] brings the libtpu of its jax version: TPU VMs run on it, and the planner
        # (python -m opera_jax.plan --topology=…) compiles TPU programs with it on any machine.
        "tpu": ["jax[tpu]>=0.10.0,<0.12"],
        # Readers of Parquet, Hugging Face datasets on disk and TFDS (data/tables.py): ~300 MB
        # with pyarrow and pandas, needed only by runs that read those sources.
        "data": ["pyarrow>=15", "datasets>=3.0", "tensorflow-datasets>=4.9.5"],
        # Weights & Biases logging (train/metrics.py), only when log.wandb_project is set.
        "wandb": ["wandb>=0.19"],
        # reward.math_match=math_verify: equivalent answers (0.5, 1/2, \frac{1}{2}) match.
        "math": ["math-verify>=0.7"],
        # torch is the CPU build pinned on purpose: the reference in parity tests only.
        # pytest-xdist: the suite runs on two workers (pytest.ini).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "torch==2.13.0",
                 "pyarrow>=15", "datasets>=3.0", "tensorflow-datasets>=4.9.5", "wandb>=0.19",
                 "math-verify>=0.7"],
    },
)
