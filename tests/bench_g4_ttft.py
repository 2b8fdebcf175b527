"""Cross-instance prefix reuse TTFT, one run: engine B with the shared tier (G4) against engine C without it
(both KVBM on, the same flags), on prefixes engine A computed and hit once (so A wrote them to G4). B's and C's
requests alternate so that noise hits both; TTFT p50 of each and their ratio. Not a test: a measurement.

  flock /tmp/kvbm-engine.lock env PYTHONPATH=$PWD python tests/bench_g4_ttft.py MODEL_DIR [PREFIX_BLOCKS]
"""
import json, random, statistics, sys, time, urllib.request, threading, contextlib
sys.path.insert(0, "tests")
from vllm_server import vllm_server, free_port
from kvbm.mechanism.remote.local_server import RedisServer
from kvbm_cli.bench.ttft import first_token_seconds

KV = json.dumps({"kv_connector": "DynamoConnector", "kv_role": "kv_both", "kv_connector_module_path": "kvbm.vllm_integration.connector"})
ARGS = ["--kv-transfer-config", KV, "--seed", "0"]
model = sys.argv[1]
N, PREFIX, SUFFIX = 5, int(sys.argv[2] if len(sys.argv) > 2 else 64) * 128, 128
rng = random.Random(5)
prefixes = [[rng.randrange(10, 2000) for _ in range(PREFIX)] for _ in range(N)]
def prompt(p, tail): return prefixes[p] + [rng.randrange(10, 2000) for _ in range(SUFFIX)]
def complete(url, tokens):
    body = json.dumps({"model": model, "prompt": tokens, "max_tokens": 4, "temperature": 0}).encode()
    urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}), timeout=300).read()
with RedisServer() as srv, contextlib.ExitStack() as st:
    base = {"DYN_KVBM_CPU_CACHE_GB": "1", "PYTHONHASHSEED": None, "VLLM_CPU_KVCACHE_SPACE": "2"}
    urls = [None] * 3
    envs = [base | {"DYN_KVBM_REMOTE_URL": srv.url}, base | {"DYN_KVBM_REMOTE_URL": srv.url}, base]
    def start(i): urls[i] = st.enter_context(vllm_server(model, ARGS, envs[i], max_model_len=16384, log_path=f"/tmp/h12a_ttft_{i}.log"))
    ths = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    [t.start() for t in ths]; [t.join() for t in ths]
    a, b, c = urls
    for p in range(N):  # A computes each prefix and hits it once: written to G4
        complete(a, prompt(p, 0)); complete(a, prompt(p, 1))
    time.sleep(2); complete(a, [7] * 20)
    print("keys in G4:", srv.cli("dbsize"))
    complete(b, [9] * 200); complete(c, [9] * 200)  # warm-up
    tb, tc = [], []
    for p in range(N):
        tokens = prompt(p, 2)
        if p % 2:
            tc.append(first_token_seconds(c, model, tokens)); tb.append(first_token_seconds(b, model, tokens))
        else:
            tb.append(first_token_seconds(b, model, tokens)); tc.append(first_token_seconds(c, model, tokens))
    mb, mc = statistics.median(tb), statistics.median(tc)
    print(json.dumps({"prefix_tokens": PREFIX, "suffix_tokens": SUFFIX, "prompts": N,
                      "ttft_p50_baseline_s": round(mc, 4), "ttft_p50_shared_g4_s": round(mb, 4),
                      "ratio": round(mc / mb, 2), "baseline_s": [round(x, 3) for x in tc], "g4_s": [round(x, 3) for x in tb]}))
