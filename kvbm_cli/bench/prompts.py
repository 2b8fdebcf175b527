"""Prompts of exact length in the server's tokens, for the chat and completions endpoints.

The text is made of words that are one token each (with their leading space), so n words are n tokens whatever
surrounds them. The chat template is rendered by the model's own tokenizer (apply_chat_template, as vLLM does)
and its head and tail counted in: a P-token prefix and an I-token suffix make exactly P + I tokens.

Operations:
  PromptTokenizer(source)   .count(endpoint, text), .head_tail(endpoint) (tokens the template adds around the
                            message), .words(rng, n) (n random one-token words)
  build_prefix(tok, endpoint, n_tokens, rng)                 n_tokens with the template's head before it
  build_prompt(tok, endpoint, prefix, prefix_tokens, n, rng) prefix + random words: n tokens (else CliError, exit 2)
"""

from __future__ import annotations

import random
import re
from functools import cached_property
from pathlib import Path

from kvbm_cli._errors import CliError

_SENTINEL = "\x00KVBM-CONTENT\x00"


class PromptTokenizer:
    """The model's tokenizer and chat template, as the server applies them."""

    def __init__(self, source: str):
        from transformers import AutoTokenizer

        local = Path(source).expanduser()
        self.source = str(local) if local.exists() else source
        try:
            self.hf = AutoTokenizer.from_pretrained(self.source, local_files_only=True)
        except (OSError, ValueError):
            raise CliError(f"tokenizer not found: {source} is neither a model directory with a tokenizer nor a "
                           "model in the local Hugging Face cache; pass --tokenizer DIR") from None
        self.tok = self.hf.backend_tokenizer  # the `tokenizers` object: fast encode and decode

    def _render(self, content: str) -> str:
        if not self.hf.chat_template:
            raise CliError(f"the tokenizer of {self.source} has no chat template; use --endpoint-type completions")
        return self.hf.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)

    def count(self, endpoint: str, text: str) -> int:
        """Prompt tokens vLLM counts for `text` as the one user message (chat) or the prompt (completions)."""
        if endpoint == "chat":
            return len(self.tok.encode(self._render(text), add_special_tokens=False).ids)
        return len(self.tok.encode(text, add_special_tokens=True).ids)

    def head_tail(self, endpoint: str) -> tuple[int, int]:
        """Tokens added before and after the message text."""
        if endpoint == "completions":
            return len(self.tok.encode("", add_special_tokens=True).ids), 0
        head, _, tail = self._render(_SENTINEL).partition(_SENTINEL)
        return (len(self.tok.encode(head, add_special_tokens=False).ids),
                len(self.tok.encode(tail, add_special_tokens=False).ids))

    @cached_property
    def vocab_words(self) -> list[str]:
        """Words (with a leading space) that are exactly one token each; sorted for determinism."""
        words = [text for i in range(min(self.tok.get_vocab_size(), 200_000))
                 if re.fullmatch(r" [a-z]{2,12}", text := self.tok.decode([i]))
                 and self.tok.encode(text, add_special_tokens=False).ids == [i]]
        if len(words) < 20:
            raise CliError(f"the tokenizer of {self.source} has too few one-token words ({len(words)}) to build "
                           "prompts of exact length")
        return sorted(words)

    def words(self, rng: random.Random, n: int) -> str:
        """A string of exactly `n` tokens (inside a larger text too): n random one-token words."""
        pool = self.vocab_words
        return "".join(rng.choice(pool) for _ in range(n))


def build_prompt(tok: PromptTokenizer, endpoint: str, prefix_text: str, prefix_tokens: int, n_total: int,
                 rng: random.Random) -> str:
    """`prefix_text` (its tokens, template head included, are `prefix_tokens`) + random words: `n_total` tokens."""
    _, tail = tok.head_tail(endpoint)
    n_suffix = n_total - prefix_tokens - tail
    if n_suffix < 0:
        raise CliError(f"a {n_total}-token prompt cannot hold the {prefix_tokens}-token prefix and the "
                       f"template's {tail} closing tokens")
    text = prefix_text + tok.words(rng, n_suffix)
    got = tok.count(endpoint, text)
    if got != n_total:
        raise CliError(f"built a {got}-token prompt instead of {n_total}: the tokenizer merges across words")
    return text


def build_prefix(tok: PromptTokenizer, endpoint: str, n_tokens: int, rng: random.Random) -> str:
    """Text whose tokens, with the template's head before it, are exactly `n_tokens`."""
    head, _ = tok.head_tail(endpoint)
    if n_tokens < head:
        raise CliError(f"--prefix-prompt-length {n_tokens} is shorter than the chat template's head "
                       f"({head} tokens)")
    return tok.words(rng, n_tokens - head)
