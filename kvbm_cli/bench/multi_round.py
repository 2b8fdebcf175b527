"""`kvbm bench multi-round`: LMBenchmark's synthetic multi-round QA, with its flag names and defaults.

A user's first question carries a system prompt all users share (`--shared-system-prompt` tokens) and its own
context (`--user-history-prompt`); each later one carries the whole chat so far (answers of `--answer-len`
tokens), so KV reuse spans users and rounds. `--num-users` users are active at once, each asking every
num_users/qps s; they start in steady state as LMBenchmark's ramp-up does (staggered, some mid-conversation),
and a finished user is replaced until `--time` is up (without it: no replacements). A warm-up of 1 user, 2
rounds at QPS 2 runs first, as in long_input_short_output_run.sh (left out of the statistics).

Operations:
  MultiRoundConfig                                  the options (LMBenchmark's flags) and the run (`drive`)
  reuse_accounting(records, ...), explain_reuse    which prompt tokens could have come from a cache, which did
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from typing import Any, Optional

from pydantic import Field

from kvbm_cli.bench import common
from kvbm_cli.bench.client import RequestSpec, Target
from kvbm_cli.bench.prompts import PromptTokenizer


class MultiRoundConfig(common.WorkloadConfig):
    """LMBenchmark's synthetic multi-round QA: long shared context, growing per-user chat history."""

    name = "multi-round"
    num_users: int = Field(15, ge=1, description="Users active at once.")
    num_rounds: int = Field(20, ge=1, description="Questions per user.")
    qps: float = Field(0.1, gt=0, description="Overall requests per second (each user asks every num_users/qps s).")
    shared_system_prompt: int = Field(1000, ge=0, description="Tokens of the system prompt all users share.")
    user_history_prompt: int = Field(20000, ge=0, description="Tokens of each user's own context.")
    answer_len: int = Field(100, ge=1, description="Tokens per answer (exact).")
    init_user_id: int = Field(0, description="User ids start after this.")
    time: Optional[float] = Field(100.0, ge=0, description="Seconds to keep starting requests (users are replaced "
                                                           "as they finish); 0: until the first users finish.")
    warmup: bool = Field(True, description="1 user, 2 rounds at QPS 2 first.")
    request_with_user_id: bool = Field(True, description="Send each user's id as the x-user-id header.")
    random_seed: int = Field(0, description="Seed of the prompt words.")

    async def drive(self, tok: PromptTokenizer, target: Target) -> None:
        """One task per user, timed as LMBenchmark's UserSessionManager: a user asks its next question `gap` s after
        its previous one, once that one is answered; users join every `join_gap` s while fewer than --num-users."""
        shared = tok.words(random.Random(self.random_seed), self.shared_system_prompt)
        gap = self.num_users / self.qps
        join_gap = gap * max(self.num_rounds - 1, 1) / self.num_users
        user_ids = itertools.count(self.init_user_id + 1)

        async with target.session(self.num_users + 2) as send_one:
            async def user(user_id: int, rounds: int, every: float, asked: int = 0, last: Optional[float] = None,
                           deadline: Optional[float] = None, warmup: bool = False) -> None:
                rng = random.Random(f"{self.random_seed}-{user_id}")
                context = (f"Hi, here's some system prompt:{shared}. For user {user_id}, here are some other "
                           f"context:{tok.words(rng, self.user_history_prompt)}.")
                history: list[dict[str, str]] = []
                for question_id in range(asked + 1, rounds + 1):
                    if last is not None:
                        await asyncio.sleep(max(0.0, min(last + every, deadline or math.inf) - time.monotonic()))
                    last = time.monotonic()
                    if deadline is not None and last >= deadline:
                        return
                    question = f"Here's question #{question_id}: can you tell me a new long story with a happy ending?"
                    history.append({"role": "user", "content": ("" if history else context) + question})
                    spec = RequestSpec(request_id=f"{'warmup-' if warmup else ''}u{user_id}-q{question_id}",
                                       endpoint="chat", max_tokens=self.answer_len, messages=list(history),
                                       user_id=user_id, round=question_id, warmup=warmup,
                                       # LMBenchmark's header, for routers that keep a user on one engine
                                       headers={"x-user-id": str(user_id)} if self.request_with_user_id else {})
                    sent = await send_one(spec, ignore_eos=True)
                    history.append({"role": "assistant", "content": sent.text})

            if self.warmup:
                await user(self.init_user_id, 2, 0.5, warmup=True)
            start = time.monotonic()
            deadline = start + self.time if self.time else None
            users = set()
            for i in range(self.num_users):  # placed as if the run had been going for a whole session (ramp-up)
                offset = (self.num_users - i) * join_gap
                asked = min(int(offset / gap) + 1, self.num_rounds - 1) if self.num_rounds > 1 else 0
                last = start - offset + max(asked - 1, 0) * gap if asked else None
                users.add(asyncio.create_task(user(next(user_ids), self.num_rounds, gap, asked, last, deadline)))
            last_join = start
            while deadline is not None and (now := time.monotonic()) < deadline:  # replace the users who finish
                users = {u for u in users if not u.done()}
                if len(users) < self.num_users and now - last_join > join_gap:
                    users.add(asyncio.create_task(user(next(user_ids), self.num_rounds, gap, deadline=deadline)))
                    last_join = now
                await asyncio.sleep(0.02)
            await asyncio.gather(*users)


def reuse_accounting(records: list, shared_system_prompt: int, block_size: int = 128,
                     g1_hits: Optional[float] = None, kvbm_hits: Optional[float] = None) -> dict[str, Any]:
    """Split the prompt tokens of a run (warm-up included, as vLLM's counters count it) by where they could come
    from, from token counts alone (an estimate: chat-template tokens at the seams are not counted apart):

      first_round_new   a user's first question: its own context (never seen) beyond the shared system prompt
      new               later rounds: the new question and template tokens, beyond the previous round's
                        prompt and answer (the answer's last token has no KV yet)
      partial_block     the tail of the reusable part that does not fill a block: never stored, always recomputed
      reusable          whole blocks computed by an earlier request (shared prompt, previous rounds)

    With vLLM's counters: of `reusable`, what G1 had (g1_hits), what KVBM onboarded (kvbm_hits) and the rest
    (evicted from every tier, or asked for before the previous round's store finished)."""
    acc = dict(queried=0, first_round_new=0, new=0, partial_block=0, reusable=0)
    last: dict[Any, Any] = {}
    for r in sorted((r for r in records if not r.error), key=lambda r: r.start_s):
        n = r.input_tokens
        prev = last.get(r.user_id)
        if prev is None:  # a first round: only the shared system prompt can be known, if anyone came before
            could = min(shared_system_prompt, n - 1) if last else 0
            acc["first_round_new"] += n - could
        else:
            could = min(prev.input_tokens + prev.output_tokens - 1, n - 1)
            acc["new"] += n - could
        full = could // block_size * block_size
        acc["partial_block"] += could - full
        acc["reusable"] += full
        acc["queried"] += n
        last[r.user_id] = r
    if g1_hits is not None and kvbm_hits is not None:
        acc |= {"g1_hits": g1_hits, "kvbm_hits": kvbm_hits, "reusable_missed": acc["reusable"] - g1_hits - kvbm_hits}
    return acc


def explain_reuse(acc: dict[str, Any]) -> str:
    """One sentence of reuse_accounting's split."""
    f = lambda key: f"{acc[key]:,.0f}"  # noqa: E731
    text = (f"{f('queried')} prompt tokens: {f('first_round_new')} in first rounds (a user's own context, never "
            f"seen before), {f('new')} new in later rounds (the question and template), {f('partial_block')} in "
            f"partial blocks (never stored), {f('reusable')} in whole blocks computed earlier")
    if "g1_hits" in acc:
        text += (f": G1 had {f('g1_hits')}, KVBM onboarded {f('kvbm_hits')}, {f('reusable_missed')} came from "
                 "neither (evicted everywhere, or asked for before their store finished)")
    return text + " (estimated from token counts)."
