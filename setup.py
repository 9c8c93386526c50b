"""dlm_megatron: pretraining diffusion language models on megatron-core + DeepSpeed."""
from pathlib import Path

from setuptools import find_packages, setup

# torch is pinned to the build that the CPU development machines carry; on clusters install
# the CUDA build of the same minor first (pip keeps an already-satisfying torch).
INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.16.1",
    "deepspeed>=0.19.8",
    "wandb>=0.31",
    "webdataset>=1.0.2",
    "numpy>=1.26",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "pyyaml>=6",
    "tqdm>=4.66",
    # tools/shard.py inputs and tokenizers: Parquet, .zst, tiktoken ranks files
    "pyarrow>=15",
    "zstandard>=0.22",
    "tiktoken>=0.7",
    # GGUF export (llama.cpp)
    "gguf>=0.10",
]

setup(
    name="dlm_megatron",
    version="0.1.0",
    description="Pretraining diffusion language models (masked, block, continuous) at scale on megatron-core and DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text() if Path(__file__).with_name("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dlm_megatron", "dlm_megatron.*"]),
    package_data={"dlm_megatron": ["assets/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # transformers verifies Hugging Face exports (and imports Llama/Qwen2 checkpoints);
        # xdist and timeout: the GPU check's pytest flags, which its dry run parses on CPU
        "test": ["pytest>=8", "transformers>=4.45", "pytest-xdist", "pytest-timeout"],
        "export": ["transformers>=4.45"],
        # NVIDIA apex and Transformer Engine are built from source on GPU clusters; note the
        # PyPI package named "apex" is an unrelated project and must never be installed.
        "gpu": ["transformer_engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "dlm-train=dlm_megatron.train:main",
            "dlm-generate=dlm_megatron.generate:main",
            "dlm-eval=dlm_megatron.eval:main",
        ]
    },
)
