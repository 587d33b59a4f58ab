"""blockdiff: a PyTorch engine for DiffusionGemma-family block-diffusion language models."""
from .checkpoint import load_model
from .config import ModelConfig
from .diffusion.reference import ReferenceOutput, reference_generate
from .model.transformer import DiffusionGemma

__all__ = ["DiffusionGemma", "ModelConfig", "ReferenceOutput", "load_model", "reference_generate"]
