"""`kvbm bench multi-round`: LMBenchmark's synthetic multi-round QA, with its flag names and defaults.

Each user's first question carries a system prompt shared by all users (`--shared-system-prompt` tokens) and
the user's own context (`--user-history-prompt` tokens); every later question carries the whole chat so far
(questions and the server's answers of `--answer-len` tokens). So KV reuse spans users (the shared prompt) and
rounds (the history). `--num-users` users are active at once, each asking every num_users/qps seconds (overall
`--qps`); they start in steady state as LMBenchmark's ramp-up does (staggered, some mid-conversation), and a
finished user is replaced by a new one until `--time` is up (without --time: no replacements). A warm-up of
1 user, 2 rounds at QPS 2 runs first, as in long_input_short_output_run.sh (left out of the statistics).

Operations:
  MultiRoundConfig                  the options (field names = LMBenchmark's flags)
  run_multi_round(cfg, ...)         run the sessions against a server, write requests.jsonl + summary.json
  reuse_accounting(records, ...)    which prompt tokens could have come from a cache at all, and which did
  kvbm bench multi-round ...        the command
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import Field, field_validator

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
    time: Optional[float] = Field(100.0, gt=0, description="Seconds to keep starting requests (users are replaced "
                                                           "as they finish); 0: until the first users finish.")
    warmup: bool = Field(True, description="1 user, 2 rounds at QPS 2 first.")
    request_with_user_id: bool = Field(True, description="Send each user's id as the x-user-id header.")
    random_seed: int = Field(0, description="Seed of the prompt words.")

    @field_validator("time", mode="before")
    @classmethod
    def _zero_is_none(cls, value: Any) -> Any:
        return value or None

    async def drive(self, tok: PromptTokenizer, target: Target) -> None:
        await _drive(self, tok, target)


@dataclass
class _Session:
    user_id: int
    num_rounds: int
    gap_s: float
    system_text: str
    warmup: bool = False
    question_id: int = 0
    last_request: Optional[float] = None
    busy: bool = False
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.question_id >= self.num_rounds and not self.busy

    def due(self, now: float) -> bool:
        if self.busy or self.question_id >= self.num_rounds:
            return False
        return self.last_request is None or now - self.last_request > self.gap_s

    def next_request(self, now: float, run_tag: str) -> RequestSpec:
        question = (f"Here's question #{self.question_id + 1}: can you tell me a new long story with a happy "
                    "ending?")
        if not self.history:
            question = self.system_text + question
        self.history.append({"role": "user", "content": question})
        self.question_id += 1
        self.last_request = now
        self.busy = True
        return RequestSpec(request_id=f"{run_tag}u{self.user_id}-q{self.question_id}", endpoint="chat",
                           max_tokens=None, messages=list(self.history), user_id=self.user_id,
                           round=self.question_id, warmup=self.warmup)


class _Workload:
    """The user sessions of one run: LMBenchmark's UserSessionManager timing."""

    def __init__(self, cfg: MultiRoundConfig, tok: PromptTokenizer):
        self.cfg = cfg
        self.tok = tok
        rng = random.Random(cfg.random_seed)
        self.shared = tok.words(rng, cfg.shared_system_prompt)
        self.gap_per_user = cfg.num_users / cfg.qps
        alive = self.gap_per_user * max(cfg.num_rounds - 1, 1)
        self.gap_between_users = alive / cfg.num_users
        self.next_user_id = cfg.init_user_id + 1

    def system_text(self, user_id: int) -> str:
        rng = random.Random(f"{self.cfg.random_seed}-{user_id}")
        return (f"Hi, here's some system prompt:{self.shared}. For user {user_id}, here are some other "
                f"context:{self.tok.words(rng, self.cfg.user_history_prompt)}.")

    def new_session(self, warmup: bool = False, user_id: Optional[int] = None, rounds: Optional[int] = None,
                    gap: Optional[float] = None) -> _Session:
        if user_id is None:
            user_id = self.next_user_id
            self.next_user_id += 1
        return _Session(user_id=user_id, num_rounds=rounds or self.cfg.num_rounds, gap_s=gap or self.gap_per_user,
                        system_text=self.system_text(user_id), warmup=warmup)

    def ramp_up(self, now: float) -> list[_Session]:
        """num_users sessions placed as if the run had been going for a whole session (LMBenchmark's ramp-up)."""
        sessions = []
        ramp = self.cfg.num_users * self.gap_between_users
        for i in range(self.cfg.num_users):
            s = self.new_session()
            offset = ramp - i * self.gap_between_users
            passed = int(offset / self.gap_per_user) + 1 if self.cfg.num_rounds > 1 else 0
            passed = min(passed, self.cfg.num_rounds - 1)
            s.question_id = passed
            s.last_request = now - offset + max(passed - 1, 0) * self.gap_per_user if passed else None
            sessions.append(s)
        return sessions


async def _drive(cfg: MultiRoundConfig, tok: PromptTokenizer, target: Target) -> None:
    wl = _Workload(cfg, tok)
    in_flight: set[asyncio.Task] = set()

    async with target.session(cfg.num_users + 2) as send_one:
        def launch(s: _Session, now: float) -> None:
            spec = s.next_request(now, "warmup-" if s.warmup else "")
            spec.max_tokens = cfg.answer_len
            if cfg.request_with_user_id:  # LMBenchmark's header, for routers that keep a user on one engine
                spec.headers = {"x-user-id": str(s.user_id)}

            async def one() -> None:
                sent = await send_one(spec, ignore_eos=True)
                s.history.append({"role": "assistant", "content": sent.text})
                s.busy = False

            t = asyncio.create_task(one())
            in_flight.add(t)
            t.add_done_callback(in_flight.discard)

        async def loop(sessions: list[_Session], deadline: Optional[float], replace: bool) -> None:
            last_join = time.monotonic()
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                sessions[:] = [s for s in sessions if not s.finished]
                if replace and len(sessions) < cfg.num_users and now - last_join > wl.gap_between_users:
                    sessions.append(wl.new_session())
                    last_join = now
                if not sessions and not replace:
                    break
                for s in sessions:
                    if s.due(now):
                        launch(s, now)
                await asyncio.sleep(0.02)
            if in_flight:
                await asyncio.gather(*list(in_flight))

        if cfg.warmup:
            warm = wl.new_session(warmup=True, user_id=cfg.init_user_id, rounds=2, gap=0.5)
            await loop([warm], None, replace=False)
        start = time.monotonic()
        deadline = start + cfg.time if cfg.time is not None else None
        await loop(wl.ramp_up(start), deadline, replace=cfg.time is not None)


run_multi_round = common.run_workload
multi_round = common.workload_command(MultiRoundConfig)


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
