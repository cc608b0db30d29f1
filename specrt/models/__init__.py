"""Native Llama-family models on specrt's paged KV cache, checkpoint loading (HF safetensors
directories and GGUF files) and tokenizers."""
from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .llama import CheckpointError, LlamaModel, ModelOutput

__all__ = [
    "ModelConfig",
    "SUPPORTED_ARCHITECTURES",
    "LlamaModel",
    "ModelOutput",
    "CheckpointError",
    "load_model",
    "Tokenizer",
]


def __getattr__(name):
    # The loader and tokenizer pull in safetensors / gguf / tokenizers: import them on demand.
    if name == "load_model":
        from .loader import load_model

        return load_model
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(name)
