"""Run a real Prometheus server (Debian's `prometheus` package, installed by `make prometheus`) for tests.

Operations:
  prometheus_bin()                               path of the prometheus binary, or pytest.skip with the fix
  prometheus_server(jobs, workdir, interval=)    context manager: own config and data dir, free port; yields URL
  query_range(url, expr, start, end, step)       the result list of /api/v1/query_range (raises on an error)
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest
import yaml

from vllm_server import free_port


def prometheus_bin(name: str = "prometheus") -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed: run `make prometheus` (Debian package prometheus)")
    return path


@contextlib.contextmanager
def prometheus_server(jobs: Mapping[str, Sequence[str]], workdir: Path, *, interval: str = "1s") -> Iterator[str]:
    """Prometheus scraping `jobs` ({job: ["host:port", ...]}) every `interval` on a free port; yields its URL."""
    binary = prometheus_bin()
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}
                                 for job, targets in jobs.items()]}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(workdir / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def query_range(url: str, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
    resp = httpx.get(url + "/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step},
                     timeout=30)
    body = resp.json()
    if body.get("status") != "success":
        raise AssertionError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def wait_for_targets(url: str, count: int, timeout_s: float = 30.0) -> None:
    """Until `count` scrape targets are up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        targets = httpx.get(url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        if sum(t["health"] == "up" for t in targets) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"targets not up after {timeout_s} s: {targets}")


DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "grafana" / "dashboards" / "kvbm.json"


def dashboard_exprs(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the Grafana dashboard JSON."""
    import json

    exprs = []

    def walk(panels):
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                exprs.append((panel["title"], target["expr"]))

    walk(json.loads(path.read_text())["panels"])
    return exprs
