"""The result-file schema: exact fields, round trips, statistics over non-warm-up requests."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kvbm_cli.results import (RequestRecord, read_run, stats_of, summarize, write_run)

REQUEST_FIELDS = {"request_id", "run", "workload", "start_s", "ttft_s", "itl_s", "e2e_s", "input_tokens",
                  "output_tokens", "prefix_id", "user_id", "round", "warmup", "error"}
SUMMARY_FIELDS = {"run", "workload", "url", "model", "driver", "started_at", "duration_s", "config", "engine",
                  "num_requests", "num_errors", "ttft_s", "itl_s", "e2e_s", "output_tokens_per_s",
                  "input_tokens_per_s", "requests_per_s"}


def _rec(i: int, ttft: float | None, *, warmup: bool = False, error: str | None = None) -> RequestRecord:
    return RequestRecord(request_id=f"r{i}", run="t", workload="prefix-reuse", start_s=1000.0 + i, ttft_s=ttft,
                         itl_s=[0.01, 0.03] if ttft else [], e2e_s=(ttft or 0) + 0.5 if error is None else None,
                         input_tokens=100, output_tokens=10 if error is None else 0, prefix_id=i % 2,
                         warmup=warmup, error=error)


def test_stats_match_numpy_linear_percentiles():
    s = stats_of([4.0, 1.0, 3.0, 2.0, None])
    assert (s.mean, s.min, s.max, s.p50) == (2.5, 1.0, 4.0, 2.5)
    assert s.p90 == pytest.approx(3.7) and s.p99 == pytest.approx(3.97)
    assert stats_of([]).model_dump() == {k: None for k in ("mean", "p50", "p90", "p99", "min", "max")}


def test_summary_excludes_warmup_and_counts_errors(tmp_path):
    recs = [_rec(0, 9.0, warmup=True), _rec(1, 0.2), _rec(2, 0.4), _rec(3, None, error="HTTP 500: boom")]
    summ = summarize(recs, run="t", workload="prefix-reuse", url="http://x", model="m", duration_s=2.0)
    assert summ.num_requests == 3 and summ.num_errors == 1
    assert summ.ttft_s.max == 0.4 and summ.ttft_s.p50 == pytest.approx(0.3)
    assert summ.itl_s.mean == pytest.approx(0.02)
    assert summ.output_tokens_per_s == 10.0 and summ.input_tokens_per_s == 100.0 and summ.requests_per_s == 1.0
    write_run(tmp_path / "run", recs, summ)
    lines = (tmp_path / "run" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[0])) == REQUEST_FIELDS
    raw = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(raw) == SUMMARY_FIELDS and set(raw["ttft_s"]) == {"mean", "p50", "p90", "p99", "min", "max"}
    back_recs, back_summ = read_run(tmp_path / "run")
    assert back_recs == recs and back_summ == summ


def test_schema_rejects_unknown_fields_and_workloads():
    with pytest.raises(ValidationError):
        RequestRecord.model_validate({**_rec(1, 0.1).model_dump(), "extra": 1})
    with pytest.raises(ValidationError):
        RequestRecord.model_validate({**_rec(1, 0.1).model_dump(), "workload": "other"})
