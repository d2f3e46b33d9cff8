"""Grok-1 hyper-parameters: the released model as a preset, and the official `config.json` reader.

Field names are the official ones (`LanguageModelConfig` / `TransformerConfig` in xai-org/grok-1's
`model.py`); every size that follows from them (FFN width, head groups) is a property computed here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# The three multipliers of the released model. They are constants of the release, not functions of the
# shape: the official tiny fixtures and every synthetic model carry the same values.
RELEASED_EMBEDDING_MULTIPLIER = 78.38367176906169  # sqrt(6144)
RELEASED_OUTPUT_MULTIPLIER = 0.5773502691896257  # 1/sqrt(3)
RELEASED_ATTN_OUTPUT_MULTIPLIER = 0.08838834764831845  # 1/sqrt(128)

# Which official dataclass each field lives in (for reading and writing config.json).
_LANGUAGE_MODEL_FIELDS = (
    "vocab_size",
    "pad_token",
    "eos_token",
    "sequence_len",
    "embedding_multiplier_scale",
    "output_multiplier_scale",
)
_TRANSFORMER_FIELDS = (
    "emb_size",
    "key_size",
    "num_q_heads",
    "num_kv_heads",
    "num_layers",
    "widening_factor",
    "attn_output_multiplier",
    "num_experts",
    "num_selected_experts",
)
_INT_FIELDS = {
    "vocab_size",
    "pad_token",
    "eos_token",
    "bos_token",
    "sequence_len",
    "emb_size",
    "key_size",
    "num_q_heads",
    "num_kv_heads",
    "num_layers",
    "num_experts",
    "num_selected_experts",
    "rope_base",
}


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """The official `ffn_size`: 2/3 of the widened size, rounded up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


@dataclass(frozen=True)
class Grok1Config:
    """Hyper-parameters of a Grok-1-architecture model. Defaults are the released Grok-1."""

    vocab_size: int = 128 * 1024
    pad_token: int = 0
    eos_token: int = 2
    sequence_len: int = 8192
    embedding_multiplier_scale: float = RELEASED_EMBEDDING_MULTIPLIER
    output_multiplier_scale: float = RELEASED_OUTPUT_MULTIPLIER
    emb_size: int = 48 * 128
    key_size: int = 128
    num_q_heads: int = 48
    num_kv_heads: int = 8
    num_layers: int = 64
    widening_factor: float = 8.0
    attn_output_multiplier: float = RELEASED_ATTN_OUTPUT_MULTIPLIER
    num_experts: int = 8
    num_selected_experts: int = 2
    # Constants hard-coded in the official model.py; fields so that they are named in one place.
    bos_token: int = 1
    rms_norm_eps: float = 1e-5
    rope_base: int = 10000
    attn_logit_softcap: float = 30.0
    name: str = field(default="grok-1", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def value_size(self) -> int:
        return self.key_size

    @property
    def q_heads_per_kv_head(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def q_proj_size(self) -> int:
        return self.num_q_heads * self.key_size

    @property
    def kv_proj_size(self) -> int:
        return self.num_kv_heads * self.key_size

    def num_parameters(self) -> int:
        d, f, e, v = self.emb_size, self.ffn_size, self.num_experts, self.vocab_size
        attention = d * self.q_proj_size * 2 + d * self.kv_proj_size * 2
        per_layer = attention + e * 3 * d * f + d * e + 4 * d
        return v * d + d + self.num_layers * per_layer

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "name":
                if not isinstance(value, str):
                    raise ConfigError(f"{source}: field 'name' must be a string, got {value!r}")
                continue
            if f.name in _INT_FIELDS:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(
                        f"{source}: field '{f.name}' must be an integer, got {value!r} ({type(value).__name__})"
                    )
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(
                    f"{source}: field '{f.name}' must be a finite number, got {value!r} ({type(value).__name__})"
                )
        positive = (
            "vocab_size",
            "sequence_len",
            "emb_size",
            "key_size",
            "num_q_heads",
            "num_kv_heads",
            "num_layers",
            "num_experts",
            "num_selected_experts",
            "widening_factor",
            "rms_norm_eps",
            "rope_base",
            "attn_logit_softcap",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: field '{name}' must be positive, got {getattr(self, name)!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(
                f"{source}: field 'num_q_heads' ({self.num_q_heads}) must be a multiple of "
                f"'num_kv_heads' ({self.num_kv_heads})"
            )
        if self.num_selected_experts > self.num_experts:
            raise ConfigError(
                f"{source}: field 'num_selected_experts' ({self.num_selected_experts}) exceeds "
                f"'num_experts' ({self.num_experts})"
            )
        if self.key_size % 2:
            raise ConfigError(f"{source}: field 'key_size' ({self.key_size}) must be even (RoPE rotates halves)")
        for name in ("pad_token", "eos_token", "bos_token"):
            token = getattr(self, name)
            if not 0 <= token < self.vocab_size:
                raise ConfigError(f"{source}: field '{name}' ({token}) is outside the vocabulary 0..{self.vocab_size - 1}")
        if self.ffn_size <= 0:
            raise ConfigError(
                f"{source}: fields 'widening_factor' ({self.widening_factor}) and 'emb_size' ({self.emb_size}) "
                "give an empty FFN"
            )

    def replace(self, **changes: Any) -> Grok1Config:
        return dataclasses.replace(self, **changes)

    # ---- config.json (official field names) ----------------------------------------------------
    def to_official_json(self) -> dict[str, Any]:
        """The nested layout of the official fixtures' config.json."""
        return {
            "name": self.name,
            "LanguageModelConfig": {
                **{k: getattr(self, k) for k in _LANGUAGE_MODEL_FIELDS},
                "model_size": self.emb_size,
                "fprop_dtype": "bfloat16",
            },
            "TransformerConfig": {k: getattr(self, k) for k in _TRANSFORMER_FIELDS},
            "derived": {
                "ffn_size": self.ffn_size,
                "q_heads_per_kv_head": self.q_heads_per_kv_head,
                "bos_id_of_tokenizer": self.bos_token,
            },
        }

    @classmethod
    def from_official_json(cls, data: Any, source: str = "config.json") -> Grok1Config:
        """Reads the official nested layout (`LanguageModelConfig`/`TransformerConfig`) or a flat dict."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
        values: dict[str, Any] = {}
        if "LanguageModelConfig" in data or "TransformerConfig" in data:
            for section, names in (("LanguageModelConfig", _LANGUAGE_MODEL_FIELDS), ("TransformerConfig", _TRANSFORMER_FIELDS)):
                block = data.get(section)
                if not isinstance(block, dict):
                    raise ConfigError(f"{source}: '{section}' must be a JSON object, got {type(block).__name__}")
                for name in names:
                    if name not in block:
                        raise ConfigError(f"{source}: missing field '{section}.{name}'")
                    values[name] = _check_json_type(block[name], name, f"{source}: field '{section}.{name}'")
            bos = data.get("derived", {}).get("bos_id_of_tokenizer") if isinstance(data.get("derived"), dict) else None
            if bos is not None:
                values["bos_token"] = _check_json_type(bos, "bos_token", f"{source}: field 'derived.bos_id_of_tokenizer'")
        else:
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
            for name, value in data.items():
                values[name] = value if name == "name" else _check_json_type(value, name, f"{source}: field '{name}'")
        if isinstance(data.get("name"), str):
            values["name"] = data["name"]
        else:
            values.setdefault("name", os.path.basename(os.path.dirname(os.path.abspath(source))) or "model")
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("config:", f"{source}:", 1)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Grok1Config:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        config = cls.from_official_json(data, source=path)
        config.validate(source=path)
        return config

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_official_json(), fh, indent=1)
            fh.write("\n")


def _check_json_type(value: Any, name: str, where: str) -> Any:
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r} ({type(value).__name__})")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    return value


GROK1 = Grok1Config()

PRESETS: dict[str, Grok1Config] = {
    "grok-1": GROK1,
    # A miniature Grok-1 for demos and tests (seconds on a laptop CPU).
    "tiny": Grok1Config(
        name="tiny",
        vocab_size=512,
        sequence_len=512,
        emb_size=256,
        key_size=32,
        num_q_heads=8,
        num_kv_heads=2,
        num_layers=2,
        widening_factor=2.0,
        num_experts=8,
        num_selected_experts=2,
    ),
    # The shape the performance benchmarks use: expert FFN 2816, ~0.9 GB in the release's int8 layout.
    "mid": Grok1Config(
        name="mid",
        vocab_size=32768,
        sequence_len=2048,
        emb_size=1024,
        key_size=64,
        num_q_heads=16,
        num_kv_heads=4,
        num_layers=8,
        widening_factor=4.125,
        num_experts=8,
        num_selected_experts=2,
    ),
}


def preset(name: str) -> Grok1Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
