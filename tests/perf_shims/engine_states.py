"""Where a no-reuse decode step's time goes, per engine start, for several configurations started in turn (issue 11).

    python tests/perf_shims/engine_states.py OUT none,kvbm,inactive,... [--renice api|enginecore|client] [--c1-only]

Each start: a vLLM CPU engine on the embedded tiny model (`kvbm_cli.engine`, as `kvbm serve` starts it) with this
directory's perf shim on PYTHONPATH; 2 warm-up requests; then 12 requests at concurrency 1 and 32 at concurrency 8
(256 random tokens in, 200 out, greedy, streamed). Per window it records the client's output tokens/s and TTFT p50,
vLLM's own ITL mean (engine timestamps), the CPU share and context switches of every thread of the engine's
processes (/proc), and the perf shim's per-step counters (read them with step_timing.py, the window's t0/t1).
Configurations: none (no connector), inactive (KVBM's connector, no CPU tier), kvbm (1 GB CPU tier), kvbm-off
(the same, KVBM_THREAD_PLACEMENT=off). --renice changes the priority of one engine process in every start
(API server to -10, EngineCore to +10, or this client to -10): how the session-21 runs told the API server's
starved state apart from KVBM's cost. A measuring tool, not a test: nothing imports it.
"""
import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kvbm_cli import prom  # noqa: E402
from kvbm_cli.engine import Engine, EngineSpec, build_launch, free_port  # noqa: E402

SHIM = str(Path(__file__).resolve().parent)
CLK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """pid and every descendant."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for t in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            try:
                todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
            except OSError:
                pass
    return out


def threads(pids: list[int]) -> dict:
    """(pid, tid) -> (process name, thread name, CPU seconds, voluntary, involuntary switches, last core)."""
    snap = {}
    for p in pids:
        try:
            pcomm = open(f"/proc/{p}/comm").read().strip()
            for t in os.listdir(f"/proc/{p}/task"):
                st = open(f"/proc/{p}/task/{t}/stat").read()
                f = st[st.rindex(")") + 2:].split()
                status = open(f"/proc/{p}/task/{t}/status").read()
                vol = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
                nonvol = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
                snap[(p, int(t))] = (pcomm, st[st.index("(") + 1:st.rindex(")")], (int(f[11]) + int(f[12])) / CLK,
                                     vol, nonvol, int(f[36]))
        except (OSError, IndexError, ValueError):
            continue
    return snap


def busiest(a: dict, b: dict, secs: float, n: int = 14) -> list[dict]:
    rows = []
    for k, v in b.items():
        v0 = a.get(k, (None, None, 0, 0, 0, 0))
        rows.append({"pid": k[0], "tid": k[1], "proc": v[0], "thread": v[1],
                     "cpu_pct": round(100 * (v[2] - v0[2]) / secs, 1), "vol": v[3] - v0[3], "nonvol": v[4] - v0[4],
                     "last_cpu": v[5]})
    return sorted(rows, key=lambda r: -r["cpu_pct"])[:n]


async def load(url: str, model: str, conc: int, nreq: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 2000) for _ in range(256)] for _ in range(nreq)]  # the tiny model has 2,048 ids
    recs = []
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(prompt):
            async with sem:
                body = {"model": model, "prompt": prompt, "max_tokens": 200, "min_tokens": 200, "ignore_eos": True,
                        "temperature": 0, "stream": True}
                t0, times = time.perf_counter(), []
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            times.append(time.perf_counter())
                recs.append((t0, times))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    ttft = sorted(times[0] - start for start, times in recs if times)
    return {"tok_s": sum(len(t) for _, t in recs) / wall, "ttft_p50_ms": 1000 * ttft[len(ttft) // 2]}


def renice(pids: list[int], mode: str) -> None:
    for p in pids:
        cmd, comm = open(f"/proc/{p}/cmdline").read(), open(f"/proc/{p}/comm").read()
        value = None
        if mode == "api" and "api_server" in cmd:
            value = -10
        elif mode == "enginecore" and comm.startswith("VLLM::EngineCor"):
            value = 10
        for t in os.listdir(f"/proc/{p}/task") if value is not None else []:
            os.setpriority(os.PRIO_PROCESS, int(t), value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("order", help="comma-separated configurations, started in this order")
    ap.add_argument("--renice", choices=["api", "enginecore", "client"])
    ap.add_argument("--c1-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, cfg in enumerate(args.order.split(",")):
        prof = args.out / f"prof-{i}-{cfg}"
        prof.mkdir(exist_ok=True)
        env = {"PYTHONPATH": SHIM, "KVBM_PROF_DIR": str(prof)}
        if cfg == "kvbm-off":
            env["KVBM_THREAD_PLACEMENT"] = "off"
        spec = EngineSpec(connector="none" if cfg == "none" else "kvbm", port=free_port(), host="127.0.0.1",
                          max_model_len=4096, vllm_args=["--seed", "0"],
                          cpu_cache_gb=1.0 if cfg.startswith("kvbm") else None, env=env)
        launch = build_launch(spec)
        engine = Engine(launch, log_path=args.out / f"engine-{i}-{cfg}.log")
        engine.start()
        try:
            engine.wait_healthy(600)
            if args.renice == "client":
                os.setpriority(os.PRIO_PROCESS, 0, -10)
            elif args.renice:
                renice(tree(engine.proc.pid), args.renice)
            asyncio.run(load(launch.url, launch.model, 1, 2, 999 + i))
            row = {"i": i, "cfg": cfg}
            for conc, nreq in ((1, 12),) if args.c1_only else ((1, 12), (8, 32)):
                pids = tree(engine.proc.pid)
                m0, s0, t0, p0 = prom.scrape(launch.url), threads(pids), time.time(), time.perf_counter()
                r = asyncio.run(load(launch.url, launch.model, conc, nreq, 1000 * conc + i))
                secs, t1 = time.perf_counter() - p0, time.time()
                s1, m1 = threads(pids), prom.scrape(launch.url)
                h0, h1 = (prom.histogram(m, "vllm:inter_token_latency_seconds") for m in (m0, m1))
                r |= {"vllm_itl_ms": 1000 * (h1["sum"] - h0["sum"]) / max(1, h1["count"] - h0["count"]),
                      "threads": busiest(s0, s1, secs), "t0": t0, "t1": t1}
                row[f"c{conc}"] = r
                shown = {k: round(r[k], 2) for k in ("tok_s", "ttft_p50_ms", "vllm_itl_ms")}
                print(cfg, f"c={conc}", shown, flush=True)
            results.append(row)
        finally:
            engine.stop()
        (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
