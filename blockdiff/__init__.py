"""blockdiff: a PyTorch engine for DiffusionGemma-family block-diffusion language models."""
from .checkpoint import load_model
from .config import ModelConfig
from .diffusion.reference import ReferenceOutput, reference_generate
from .engine.engine import LLM
from .engine.request import RequestOutput, SamplingParams
from .model.transformer import DiffusionGemma

__all__ = ["LLM", "DiffusionGemma", "ModelConfig", "ReferenceOutput", "RequestOutput", "SamplingParams",
           "load_model", "reference_generate"]
