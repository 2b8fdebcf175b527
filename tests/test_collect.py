"""kvbm metrics collect (scraping a real prometheus-client exporter, and a real Prometheus server's HTTP API),
kvbm metrics up/down without a Docker engine, and the dashboard files checked with promtool."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from kvbm_cli.collect import (background, format_labels, metrics_url, parse_labels, promql_name_selector,
                              query_prometheus)
from kvbm_runner import run_kvbm
from prom_server import dashboard_exprs, prometheus_bin, prometheus_server, query_range, wait_for_targets
from vllm_server import free_port

ROOT = Path(__file__).resolve().parents[1]


class _Dynamo:
    """Dynamo-style exact counters (no _total) and a gauge, as kvbm/metrics.py exports them."""

    def __init__(self):
        self.blocks = 0

    def collect(self):
        for name in ("kvbm_offload_blocks_d2h", "kvbm_onboard_blocks_h2d"):
            metric = Metric(name, name, "unknown")
            metric.add_sample(name, {}, float(self.blocks))
            yield metric
        yield GaugeMetricFamily("kvbm_host_cache_hit_rate", "hit rate", value=0.5)


@pytest.fixture(scope="module")
def exporter():
    """A real prometheus-client exporter with kvbm_* and vllm:* names, values moving in a thread."""
    registry = CollectorRegistry()
    dyn = _Dynamo()
    registry.register(dyn)
    usage = Gauge("kvbm_tier_usage_blocks", "usage", ["tier"], registry=registry)
    offload = Counter("kvbm_offload_bytes", "bytes", registry=registry)
    hits = Counter("vllm:prefix_cache_hits", "hits", ["engine", "model_name"], registry=registry)
    ttft = Histogram("vllm:time_to_first_token_seconds", "ttft", registry=registry, buckets=(0.1, 1.0))
    Counter("python_noise", "not collected by default", registry=registry).inc()
    # Prometheus' text format always, as vLLM's API server answers (prometheus-client's own server would
    # negotiate OpenMetrics with Prometheus 2.42 and rewrite the ':' of vllm:* names).
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()

    def tick():
        while not stop.wait(0.2):
            dyn.blocks += 3
            usage.labels(tier="host").set(dyn.blocks)
            usage.labels(tier="disk").set(0)
            offload.inc(3 * 4096)
            hits.labels(engine="0", model_name="a;b=c").inc(128)
            ttft.observe(0.05)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    yield f"127.0.0.1:{port}"
    stop.set()
    thread.join()
    server.shutdown()


def test_labels_round_trip_with_separators():
    labels = {"tier": "host", "model_name": "a;b=c\\d", "engine": "0"}
    text = format_labels(labels)
    assert text.startswith("engine=0;model_name=") and parse_labels(text) == labels
    assert parse_labels("") == {} and metrics_url("h:1") == "http://h:1/metrics"
    assert metrics_url("http://h:1/custom") == "http://h:1/custom"


def test_background_collection_writes_long_format_beside_a_workload(exporter, tmp_path):
    out = tmp_path / "run" / "metrics.csv"
    with background([exporter], out, interval_s=0.3) as box:
        time.sleep(1.5)
    result = box["result"]
    assert result.scrapes[f"http://{exporter}/metrics"] >= 4 and result.failures[f"http://{exporter}/metrics"] == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["t", "source", "name", "labels", "value"]
    names = set(frame["name"])
    assert {"kvbm_offload_blocks_d2h", "kvbm_onboard_blocks_h2d", "kvbm_host_cache_hit_rate", "kvbm_offload_bytes_total",
            "kvbm_tier_usage_blocks", "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_bucket"} <= names
    assert not any(n.endswith("_created") or n.startswith("python_") for n in names)
    d2h = frame[frame["name"] == "kvbm_offload_blocks_d2h"].sort_values("t")["value"].astype(float)
    assert d2h.is_monotonic_increasing and d2h.iloc[-1] > d2h.iloc[0]
    hit_labels = frame[frame["name"] == "vllm:prefix_cache_hits_total"]["labels"].iloc[0]
    assert parse_labels(hit_labels) == {"engine": "0", "model_name": "a;b=c"}
    assert set(frame[frame["name"] == "kvbm_tier_usage_blocks"]["labels"]) == {"tier=host", "tier=disk"}


def test_cli_collect_for_a_duration_into_a_run_dir(exporter, tmp_path):
    outcome = run_kvbm("metrics", "collect", "--url", exporter, "--out", str(tmp_path), "--interval", "0.2",
                       "--duration", "0.6", "--json")
    assert outcome.exit_code == 0, outcome.stderr
    data = json.loads(outcome.stdout)
    assert data["out"] == str(tmp_path / "metrics.csv") and data["rows"] > 0
    assert list(data["sources"].values())[0] >= 3


def test_cli_collect_until_a_file_appears_and_until_a_process_exits(exporter, tmp_path):
    flag = tmp_path / "summary.json"
    threading.Timer(0.8, flag.write_text, args=("{}",)).start()
    t0 = time.monotonic()
    outcome = run_kvbm("metrics", "collect", "-u", exporter, "-o", str(tmp_path / "a.csv"), "-i", "0.2",
                       "--until-file", str(flag))
    assert outcome.exit_code == 0 and 0.7 < time.monotonic() - t0 < 5, outcome.stderr
    bench = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    outcome = run_kvbm("metrics", "collect", "-u", exporter, "-o", str(tmp_path / "b.csv"), "-i", "0.2",
                       "--pid", str(bench.pid))
    bench.wait()
    assert outcome.exit_code == 0 and "wrote" in outcome.stdout, outcome.stderr


def test_cli_collect_with_nothing_answering_is_one_line_and_leaves_no_file(tmp_path):
    port = free_port()
    outcome = run_kvbm("metrics", "collect", "-u", f"127.0.0.1:{port}", "-o", str(tmp_path), "-d", "0.2")
    assert outcome.exit_code == 1 and "kvbm: no source answered" in outcome.stderr
    assert not (tmp_path / "metrics.csv").exists()
    outcome = run_kvbm("metrics", "collect", "-i", "0", "-o", str(tmp_path))
    assert outcome.exit_code == 2 and "--interval" in outcome.stderr


def test_collect_from_a_real_prometheus_server(exporter, tmp_path):
    with prometheus_server({"kvbm": [exporter]}, tmp_path / "prom", interval="1s") as prom:
        wait_for_targets(prom, 1)
        start = time.time()
        time.sleep(3.5)
        end = time.time()
        result = query_prometheus(prom, tmp_path / "p.csv", start, end, step_s=1.0)
        assert result.rows > 0 and list(result.scrapes) == [f"http://{exporter}/metrics"]
        frame = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
        assert {"kvbm_offload_blocks_d2h", "vllm:prefix_cache_hits_total"} <= set(frame["name"])
        assert not frame["labels"].str.contains("instance=|job=").any()
        # The CLI: the time range from a run's summary.json.
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({"started_at": start, "duration_s": end - start}))
        outcome = run_kvbm("metrics", "collect", "--prometheus", prom, "--out", str(run_dir))
        assert outcome.exit_code == 0, outcome.stderr
        assert (run_dir / "metrics.csv").stat().st_size > 0
        outcome = run_kvbm("metrics", "collect", "--prometheus", prom, "--out", str(tmp_path / "none.csv"),
                           "--match", "^nothing_like_this")
        assert outcome.exit_code == 1 and "no series matching" in outcome.stderr
    assert promql_name_selector("^(vllm:|kvbm_)") == '{__name__=~".*(?:^(vllm:|kvbm_)).*"}'


@pytest.mark.parametrize("command", ["up", "down"])
def test_metrics_up_down_say_in_one_line_that_no_docker_engine_is_reachable(command, tmp_path):
    outcome = run_kvbm("metrics", command, env={"DOCKER_HOST": f"unix://{tmp_path}/docker.sock"})
    assert outcome.exit_code == 1
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbm: no Docker engine reachable at unix://"), outcome.stderr
    assert "docker compose -f dashboards/docker-compose.yml" in lines[0]


def test_dashboard_expressions_parse_with_promtool(tmp_path):
    promtool = prometheus_bin("promtool")
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"kvbm:dashboard_expr_{i}", "expr": expr}
                                                        for i, (_, expr) in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = subprocess.run([promtool, "check", "config", str(ROOT / "dashboards" / "prometheus.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_covers_the_issue_and_uses_the_provisioned_datasource():
    exprs = " ".join(e for _, e in dashboard_exprs())
    for name in ("kvbm_offload_blocks_d2h", "kvbm_offload_blocks_h2d", "kvbm_onboard_blocks_h2d",
                 "kvbm_onboard_blocks_d2d", "kvbm_host_cache_hit_rate", "kvbm_disk_cache_hit_rate",
                 "kvbm_tier_usage_blocks", "kvbm_matched_tokens", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:prefix_cache_hits_total", "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting"):
        assert name in exprs
    dash = json.loads((ROOT / "dashboards" / "grafana" / "dashboards" / "kvbm.json").read_text())
    source = yaml.safe_load((ROOT / "dashboards" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid and all(t["datasource"]["uid"] == uid for t in panel["targets"])
    compose = yaml.safe_load((ROOT / "dashboards" / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_SERVER_HTTP_PORT"] == "3001"
    assert (grafana["GF_SECURITY_ADMIN_USER"], grafana["GF_SECURITY_ADMIN_PASSWORD"]) == ("dynamo", "dynamo")
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            assert (ROOT / "dashboards" / volume.split(":")[0]).exists(), volume
