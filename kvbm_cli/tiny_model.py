"""The embedded default model: a tiny Qwen3-shaped model directory made locally, with no model hub.

Config, a byte-level BPE tokenizer trained on a seeded corpus and seeded random weights: the same bytes on every
run and every machine (test_tiny_model checks it).

Operations:
  make_tiny_model(out_dir), default_model_dir()   write the model directory; the cached copy (made on first
                                                  use) other commands use when --model is not given
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "tiny-qwen3"
# Bump when anything below changes what is written, so that an old cached copy is never reused.
TINY_MODEL_VERSION = 2
MARKER = "kvbm_tiny_model.json"  # written last: a directory with it is complete

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", None, "<|im_end|>"

# Geometry (DESIGN.md section 4): 4 layers, hidden 256; GQA 4 query heads over 2 KV heads of 64, a head size
# vLLM's CPU attention supports. KV per token: 4 layers x 2 (K,V) x 2 heads x 64 x 2 bytes = 2 KiB.
NUM_LAYERS, HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 256, 4, 2, 64
INTERMEDIATE = 768
MAX_POSITIONS = 32768

# ChatML, as Qwen's, without tools or thinking: enough for /v1/chat/completions.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the a an of to in and or is are was were be been has have had do does did not no yes it this that these "
    "those there here what which who when where why how all any some many much more most few less each every "
    "cache block token tokens prefix prompt model layer layers head heads key value keys values memory host "
    "disk device tier tiers load loads store stores offload onboard evict eviction hit hits miss misses "
    "request requests response server client engine scheduler worker connector batch step time first latency "
    "throughput bandwidth byte bytes file files page pages hash chain table index pool slot slots frequency "
    "user assistant system question answer history round rounds round-trip context window long short "
    "compute recompute attention query matrix vector tensor shape stride dtype float int bf16 fp8 "
    "quick brown fox jumps over lazy dog river mountain city country people water light sound music "
    "read write copy move send receive open close start stop begin end run wait check test measure report "
    "one two three four five six seven eight nine ten hundred thousand million first second third last next "
    "good bad new old big small large little high low fast slow early late right left same different "
    "Python Rust vLLM KVBM Dynamo Qwen GPU CPU SSD NVMe DRAM HBM PCIe NIXL POSIX Linux"
).split()
_PUNCT = [".", ",", ";", ":", "?", "!"]


def _corpus(num_lines: int = 6000, seed: int = 20261123) -> list[str]:
    """A deterministic training corpus: seeded word salad with numbers, punctuation, code and markup."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 24))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice(_PUNCT)
        if i % 7 == 0:
            text = f"def f{i}(x, y):\n    return x * {rng.randint(2, 9)} + y  # {text}"
        elif i % 11 == 0:
            text = f"{{\"id\": {i}, \"text\": \"{text}\"}}"
        lines.append(text)
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


def _train_tokenizer():
    """A byte-level BPE of VOCAB_SIZE tokens (special tokens first), trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer, length=None)  # VOCAB_SIZE tokens (test_tiny_model)
    return tok


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(out_dir: str | os.PathLike[str]) -> Path:
    """Write the tiny Qwen3-shaped model into `out_dir` (created if missing) and return its path.

    Same bytes on every run, weights included (`model.safetensors`, about 9 MB of seeded random values at a
    realistic scale). vLLM's `--load-format dummy` would also serve the directory, but its weights are
    uniform in +-1e-3: attention is then nearly uniform and the output hardly depends on the KV of the
    context, so a test comparing greedy outputs could not see wrong KV. With these weights it does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    eos_id, pad_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    extra = [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)]

    tok.save(str(out / "tokenizer.json"), pretty=True)
    _dump(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": None,
        "additional_special_tokens": extra,
        "add_bos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS, "split_special_tokens": False, "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    })
    _dump(out / "special_tokens_map.json", {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                                             "additional_special_tokens": extra})
    _dump(out / "config.json", {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": VOCAB_SIZE, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": NUM_LAYERS, "num_attention_heads": NUM_HEADS, "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM, "hidden_act": "silu", "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": NUM_LAYERS,
        "bos_token_id": pad_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "torch_dtype": "bfloat16",
    })
    _dump(out / "generation_config.json", {"bos_token_id": pad_id, "eos_token_id": [eos_id, pad_id],
                                           "pad_token_id": pad_id})
    _write_weights(out / "model.safetensors")
    _dump(out / MARKER, {"name": TINY_MODEL_NAME, "version": TINY_MODEL_VERSION,
                         "weights": "model.safetensors: seeded random, realistic scale"})
    return out


def _write_weights(path: Path, seed: int = 20261124) -> None:
    """Seeded random Qwen3 weights: linear layers ~ N(0, 1/fan_in), norms 1, q/k norms 4 (sharp attention)
    and an untied head, so outputs depend on which KV is in the context."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return (torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5).to(torch.bfloat16)

    def ones(n: int, value: float = 1.0) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB_SIZE, HIDDEN, generator=gen).to(torch.bfloat16),
               "model.norm.weight": ones(HIDDEN),
               # Untied: a tied head maps the residual's own token embedding back to itself (logit |e|^2), so
               # the model would repeat its last token whatever the context holds.
               "lm_head.weight": linear(VOCAB_SIZE, HIDDEN)}
    q, kv = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    for i in range(NUM_LAYERS):
        pre = f"model.layers.{i}."
        tensors |= {pre + name + ".weight": linear(*shape) for name, shape in (  # in this order: the same draws
            ("self_attn.q_proj", (q, HIDDEN)), ("self_attn.k_proj", (kv, HIDDEN)), ("self_attn.v_proj", (kv, HIDDEN)),
            ("self_attn.o_proj", (HIDDEN, q)), ("mlp.gate_proj", (INTERMEDIATE, HIDDEN)),
            ("mlp.up_proj", (INTERMEDIATE, HIDDEN)), ("mlp.down_proj", (HIDDEN, INTERMEDIATE)))}
        tensors |= {pre + "input_layernorm.weight": ones(HIDDEN), pre + "post_attention_layernorm.weight": ones(HIDDEN),
                    pre + "self_attn.q_norm.weight": ones(HEAD_DIM, 4.0),
                    pre + "self_attn.k_norm.weight": ones(HEAD_DIM, 4.0)}
    save_file(tensors, str(path), metadata={"format": "pt"})


def default_model_dir() -> Path:
    """The embedded default model's directory ($KVBM_CACHE_DIR or ~/.cache/kvbm, /tiny-qwen3-vN), made once.

    Made in a temporary sibling and renamed into place, so concurrent first uses never see a half-written dir.
    """
    root = os.environ.get("KVBM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvbm"
    target = Path(root) / f"{TINY_MODEL_NAME}-v{TINY_MODEL_VERSION}"
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    make_tiny_model(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process won the race: its copy has the same bytes
        shutil.rmtree(tmp)
    return target
