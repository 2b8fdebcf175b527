"""Per-step timing of vLLM's step and of every KVBM connector hook, inside a real engine (issue 11).

Put this directory on PYTHONPATH and set KVBM_PROF_DIR to a directory: every vLLM process (EngineCore, workers)
then wraps EngineCore.step, Scheduler.schedule/update_from_output, Worker.execute_model/sample_tokens and the
KvbmConnector hooks with perf_counter_ns (wall) and thread_time_ns (CPU of the calling thread), and appends a
cumulative snapshot {"t", "stats": {name: [calls, wall_ns, cpu_ns]}} to KVBM_PROF_DIR/<pid>.jsonl at most once a
second. `python tests/perf_shims/step_timing.py DIR T0 T1` prints per-call means between two times.
Wall well above CPU in a hook means the engine thread waited (GIL or CPU) inside it. Without KVBM_PROF_DIR the
shim does nothing. A measuring tool, not a test: nothing imports it.
"""
import os, sys, time, json, threading, importlib.abc, importlib.util

DIR = os.environ.get("KVBM_PROF_DIR")
TARGETS = {
    "vllm.v1.engine.core": [("EngineCore", ["step"])],
    "vllm.v1.core.sched.scheduler": [("Scheduler", ["schedule", "update_from_output"])],
    "vllm.v1.worker.gpu_worker": [("Worker", ["execute_model", "sample_tokens"])],
    "vllm.v1.executor.multiproc_executor": [("MultiprocExecutor", ["execute_model"])],
    "kvbm.integrations.vllm.connector": [("KvbmConnector", [
        "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta", "update_connector_output",
        "request_finished", "start_load_kv", "wait_for_save", "get_finished", "build_connector_worker_meta",
        "get_kv_connector_stats", "handle_preemptions", "get_block_ids_with_load_errors", "save_kv_layer",
        "wait_for_layer_load"])],
}
STATS = {}
LAST = [time.monotonic()]
LOCK = threading.Lock()


def _dump():
    now = time.monotonic()
    if now - LAST[0] < 1.0:
        return
    LAST[0] = now
    with open(os.path.join(DIR, f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps({"t": time.time(), "argv0": sys.argv[0][-40:], "stats": STATS}) + "\n")


def _wrap(cls, name):
    fn = cls.__dict__.get(name)
    if fn is None or getattr(fn, "_prof", False):
        return
    key = f"{cls.__name__}.{name}"

    def wrapper(*a, **k):
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return fn(*a, **k)
        finally:
            dt, dc = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
            s = STATS.setdefault(key, [0, 0, 0])
            s[0] += 1; s[1] += dt; s[2] += dc
            if name in ("step", "execute_model"):  # wall-time histogram, 250 us buckets (last: >= 25 ms)
                h = STATS.setdefault(key + ".hist", [0] * 101)
                h[min(100, dt // 250_000)] += 1
            if name in ("step", "execute_model", "build_connector_meta", "get_finished"):
                _dump()
    wrapper._prof = True
    setattr(cls, name, wrapper)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name):
        self.inner, self.name = inner, name

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        for cls_name, methods in TARGETS[self.name]:
            cls = getattr(module, cls_name, None)
            if cls is not None:
                for m in methods:
                    _wrap(cls, m)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader, name)
        return spec


if DIR:
    sys.meta_path.insert(0, _Finder())
    import gc

    _GC_T0 = {}

    def _gc_timer(phase, info):
        """Garbage-collector pauses per generation ("gc.gen<N>": calls, wall ns, longest pause ns in the CPU slot)."""
        if phase == "start":
            _GC_T0[info["generation"]] = time.perf_counter_ns()
            return
        t0 = _GC_T0.pop(info["generation"], None)
        if t0 is not None:
            dt = time.perf_counter_ns() - t0
            s = STATS.setdefault(f"gc.gen{info['generation']}", [0, 0, 0])
            s[0] += 1
            s[1] += dt
            s[2] = max(s[2], dt)

    gc.callbacks.append(_gc_timer)
