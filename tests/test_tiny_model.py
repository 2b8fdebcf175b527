"""The embedded default model: deterministic bytes, a tokenizer that round-trips, a config transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm_cli import tiny_model
from kvbm_runner import run_kvbm

FILES = ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
         "tokenizer_config.json", "kvbm_tiny_model.json", "model.safetensors"]


def _bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_bytes_every_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    # A fresh interpreter (new hash seed, new thread timing) must write the same bytes as this one.
    other = tmp_path / "other"
    subprocess.run([sys.executable, "-c", "import sys; from kvbm_cli.tiny_model import make_tiny_model; "
                    "make_tiny_model(sys.argv[1])", str(other)], check=True)
    assert sorted(_bytes(tiny_model_dir)) == sorted(FILES)
    assert _bytes(other) == _bytes(tiny_model_dir)


def test_cli_writes_the_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "m"
    result = run_kvbm("model", "tiny", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert _bytes(out) == _bytes(tiny_model_dir)


def test_default_model_dir_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    monkeypatch.setenv("KVBM_CACHE_DIR", str(tmp_path / "cache"))
    first = tiny_model.default_model_dir()
    assert first.parent == tmp_path / "cache"
    assert _bytes(first) == _bytes(tiny_model_dir)
    mtime = (first / "tokenizer.json").stat().st_mtime_ns
    assert tiny_model.default_model_dir() == first
    assert (first / "tokenizer.json").stat().st_mtime_ns == mtime  # reused, not rewritten


def test_tokenizer_round_trips(tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == tiny_model.VOCAB_SIZE
    for text in ["The quick brown fox jumps over the lazy dog.", "KV cache block 12345: hit!",
                 "  leading spaces, tabs\tand\nnewlines ", "Unicode: déjà vu, 中文, emoji 😀", ""]:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("the cache").ids != []
    assert len(tok.encode("the cache block token").ids) <= 6  # common words are whole tokens
    for special in tiny_model.SPECIAL_TOKENS:
        assert tok.encode(special).ids == [tok.token_to_id(special)]


def test_transformers_loads_config_tokenizer_and_template(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert cfg.model_type == "qwen3"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (4, 256, 4, 2, 64)
    assert cfg.vocab_size == tiny_model.VOCAB_SIZE
    assert cfg.max_position_embeddings >= 16384
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == cfg.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg.eos_token_id
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert cfg.eos_token_id in gen["eos_token_id"]


@pytest.mark.engine
def test_vllm_serves_it(tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    import httpx

    from vllm_server import vllm_server

    with vllm_server(tiny_model_dir) as url:
        model = str(tiny_model_dir)
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "Hello, cache!"}], "max_tokens": 8,
            "temperature": 0})
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] >= 1
        comp = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": model, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert comp.status_code == 200, comp.text
        assert comp.json()["usage"]["completion_tokens"] == 8
