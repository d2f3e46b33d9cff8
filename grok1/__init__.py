"""grok1: run xAI's Grok-1 anywhere, with the official code's numerics."""

from .config import GROK1, PRESETS, Grok1Config
from .errors import CheckpointError, ConfigError, Grok1Error
from .generate import SamplingParams, generate, generate_batch, stream, stream_batch
from .loader import load
from .model import Grok1, KVCache
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GROK1",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "Grok1",
    "Grok1Config",
    "Grok1Error",
    "KVCache",
    "SamplingParams",
    "Tokenizer",
    "generate",
    "generate_batch",
    "load",
    "stream",
    "stream_batch",
]
