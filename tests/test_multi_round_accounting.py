"""The multi-round reuse accounting (no engine): which prompt tokens could have come from a cache at all."""

from __future__ import annotations

from kvbm_cli.bench.compare import comparison_markdown
from kvbm_cli.bench.multi_round import explain_reuse, reuse_accounting
from kvbm_cli.results import RequestRecord


def _rec(t: float, user: int, rnd: int, n_in: int, n_out: int, error=None) -> RequestRecord:
    return RequestRecord(request_id=f"u{user}-q{rnd}", run="r", workload="multi-round", start_s=t, ttft_s=0.1,
                         itl_s=[], e2e_s=0.2, input_tokens=n_in, output_tokens=n_out, user_id=user, round=rnd,
                         error=error)


def test_rounds_split_into_new_partial_and_reusable_blocks():
    records = [  # out of order on purpose: the accounting follows start times
        _rec(3.0, 1, 2, 1100, 20),   # previous: 1000 in + 20 out -> 1019 could be known: 896 reusable, 123 partial
        _rec(1.0, 1, 1, 1000, 20),   # the very first request: nothing could be known
        _rec(2.0, 2, 1, 900, 20),    # a first round after someone else: the shared 300 -> 256 reusable, 44 partial
        _rec(4.0, 2, 2, 950, 20, error="HTTP 500"),  # failed: not counted
    ]
    acc = reuse_accounting(records, shared_system_prompt=300, block_size=128, g1_hits=256, kvbm_hits=768)
    assert acc["queried"] == 3000
    assert acc["first_round_new"] == 1000 + (900 - 300) and acc["new"] == 1100 - 1019
    assert acc["partial_block"] == 44 + 123 and acc["reusable"] == 256 + 896
    assert sum(acc[k] for k in ("first_round_new", "new", "partial_block", "reusable")) == acc["queried"]
    assert acc["reusable_missed"] == 256 + 896 - 256 - 768
    text = explain_reuse(acc)
    assert "3,000 prompt tokens" in text and "KVBM onboarded 768" in text and "128 came from neither" in text


def test_comparison_table_explains_reuse_per_config():
    acc = reuse_accounting([_rec(1.0, 1, 1, 500, 10)], 100, 128, 0, 0)
    comp = {"configs": ["baseline"], "baseline": "baseline", "rows": [],
            "cache": [{"config": "baseline", "requests": 1, "errors": 0, "g1_hit_tokens": 0, "g1_query_tokens": 500,
                       "kvbm_hit_tokens": 0, "kvbm_query_tokens": 0, "vllm_ttft": None, "reuse": acc}]}
    assert f"- baseline: {explain_reuse(acc)}" in comparison_markdown(comp)
