"""Built-in table of common models: the config.json fields that fix their KV-cache shape and compute.

Operations:
  BUILTIN_CONFIGS           HF id -> the subset of the model's config.json that sizing reads
  find_builtin(name)        an entry by HF id or short name, case-insensitive ("qwen3-4b", "Qwen/Qwen3-4B")
  load_model_config(spec)   a config from a local directory or config.json, the local HF cache, or the table

Values are copied from each model's published config.json (field names unchanged), so a built-in entry and
a downloaded config go through the same `ModelGeometry.from_config`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from kvbm_cli._errors import CliError

_QWEN3 = {"model_type": "qwen3", "head_dim": 128, "num_key_value_heads": 8, "vocab_size": 151936,
          "max_position_embeddings": 40960, "torch_dtype": "bfloat16"}
_LLAMA31 = {"model_type": "llama", "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "tie_word_embeddings": False}

BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": {**_QWEN3, "num_hidden_layers": 28, "hidden_size": 1024, "num_attention_heads": 16,
                        "intermediate_size": 3072, "tie_word_embeddings": True},
    "Qwen/Qwen3-4B": {**_QWEN3, "num_hidden_layers": 36, "hidden_size": 2560, "num_attention_heads": 32,
                      "intermediate_size": 9728, "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {**_QWEN3, "num_hidden_layers": 36, "hidden_size": 4096, "num_attention_heads": 32,
                      "intermediate_size": 12288, "tie_word_embeddings": False},
    "Qwen/Qwen3-32B": {**_QWEN3, "num_hidden_layers": 64, "hidden_size": 5120, "num_attention_heads": 64,
                       "intermediate_size": 25600, "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-8B-Instruct": {**_LLAMA31, "num_hidden_layers": 32, "hidden_size": 4096,
                                         "num_attention_heads": 32, "intermediate_size": 14336},
    "meta-llama/Llama-3.1-70B-Instruct": {**_LLAMA31, "num_hidden_layers": 80, "hidden_size": 8192,
                                          "num_attention_heads": 64, "intermediate_size": 28672},
    "mistralai/Mistral-7B-Instruct-v0.3": {
        "model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32768,
        "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "tie_word_embeddings": False},
    "deepseek-ai/DeepSeek-V3": {
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168, "num_attention_heads": 128,
        "num_key_value_heads": 128, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128, "v_head_dim": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "vocab_size": 129280, "max_position_embeddings": 163840, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}},
}

_ALIASES = {"meta-llama/Llama-3.1-8B": "meta-llama/Llama-3.1-8B-Instruct",
            "meta-llama/Llama-3.1-70B": "meta-llama/Llama-3.1-70B-Instruct",
            "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
            "llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
            "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3"}
# lower case: the HF id, the name after its '/', or an alias -> the HF id
_NAMES = {key.lower(): model_id for model_id in BUILTIN_CONFIGS for key in (model_id, model_id.split("/", 1)[1])} | {
    alias.lower(): target for alias, target in _ALIASES.items()}


def find_builtin(name: str) -> tuple[str, dict[str, Any]] | None:
    """The (HF id, config) of a built-in model named by HF id, alias or short name; None when unknown."""
    model_id = _NAMES.get(name.strip().lower())
    return None if model_id is None else (model_id, BUILTIN_CONFIGS[model_id])


def _hf_hub_dir() -> Path:
    """Read now, not at import (huggingface_hub.constants reads the environment once)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path} as JSON ({exc}); point --model at a model directory or its config.json")
    if not isinstance(data, dict):
        raise CliError(f"{path} is not a config.json object")
    return data


def load_model_config(spec: str) -> tuple[str, dict[str, Any], str]:
    """(name, config dict, where it came from) for a directory, config.json, HF id in the cache, or built-in."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"{path} has no config.json; point --model at a model directory or its config.json")
        return path.name, _read_json(path / "config.json"), str(path / "config.json")
    if path.is_file():
        return path.parent.name if path.name == "config.json" else path.stem, _read_json(path), str(path)
    with contextlib.suppress(ValueError):  # HFValidationError: not a model id; else the snapshot refs/main names
        cached = try_to_load_from_cache(spec, "config.json", _hf_hub_dir())
        if isinstance(cached, str):
            return spec, _read_json(Path(cached)), cached
    if (builtin := find_builtin(spec)) is not None:
        return builtin[0], dict(builtin[1]), "built-in table"
    known = ", ".join(BUILTIN_CONFIGS)
    raise CliError(f"unknown model {spec!r}: not a local directory or config.json, not in the HF cache "
                   f"({_hf_hub_dir()}), not built in; give a path or one of: {known}")
