"""dlm_megatron: diffusion-language-model pretraining on megatron-core."""

__version__ = "0.1.0"
