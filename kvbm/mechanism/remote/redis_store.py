"""Shared tier on Redis (or Valkey): one server, or a Redis Cluster reached from any of its nodes.

URL: redis://[user:password@]host:port/db, rediss://... for TLS (redis-py's URL options, e.g.
?ssl_cert_reqs=none or ?socket_timeout=2, are honoured). A cluster is detected at connect time (INFO cluster)
and then driven through redis.cluster.RedisCluster, whose pipelines split a batch by node; keys are not
hash-tagged, so blocks spread over every node. Each block is one string value (see base.py), written with
SET (optionally with a TTL); kvbm never assumes a key it wrote is still there (maxmemory eviction).

Every command runs with a socket timeout (default 1 s, so a `DEBUG SLEEP` or a hung server costs at most
that), no client-side retries (the base class backs off instead), and a batch is sent as pipelines of at
most 64 MiB. After a failure the client is dropped; the next attempt after the backoff reconnects (and
detects a cluster again).

Operations: RedisStore(url, fingerprint, secret=..., block_bytes=..., timeout=1.0, ttl_s=None), then the
BlockStore API; server_info() for `kvbm doctor store`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.retry import Retry

from kvbm.mechanism.remote.base import BlockStore
from kvbm.mechanism.remote.urls import scrub

log = logging.getLogger("kvbm.remote")

PIPELINE_BYTES = 64 << 20  # values per pipeline, bounded in bytes
READ_SIZE = 1 << 20        # socket read size: KV values are large


class RedisStore(BlockStore):
    """A BlockStore on a Redis server or Redis Cluster."""

    scheme = "redis"

    def __init__(self, url: str, fingerprint: bytes, *, secret: bytes | str | None = None,
                 block_bytes: int | None = None, workers: int = 2, timeout: float = 1.0,
                 connect_timeout: float | None = None, ttl_s: int | None = None,
                 backoff_s: tuple[float, float] = (0.1, 5.0)):
        super().__init__(url, fingerprint, secret=secret, block_bytes=block_bytes, workers=workers,
                         backoff_s=backoff_s)
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self.ttl_s = ttl_s
        self.cluster = False
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._full_warned = False

    # ------------------------------------------------------------------ connection

    def _options(self) -> dict[str, Any]:
        return {"socket_timeout": self.timeout, "socket_connect_timeout": self.connect_timeout,
                "retry": Retry(NoBackoff(), 0), "socket_read_size": READ_SIZE}

    def client(self):
        """The connected redis.Redis or RedisCluster client (connecting, and detecting a cluster, when needed)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self):
        single = redis.Redis.from_url(self.url, **self._options())
        try:
            try:
                enabled = bool(single.info("cluster").get("cluster_enabled"))
            except ResponseError:  # INFO not allowed for this ACL user: treat as one server
                single.ping()
                enabled = False
        except BaseException:
            single.close()
            raise
        if not enabled:
            self.cluster = False
            return single
        single.close()
        host = single.connection_pool.connection_kwargs.get("host")
        port = single.connection_pool.connection_kwargs.get("port")
        opts = {k: v for k, v in single.connection_pool.connection_kwargs.items()
                if k in ("username", "password", "ssl", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                         "ssl_check_hostname", "socket_timeout", "socket_connect_timeout", "socket_read_size")}
        if single.connection_pool.connection_kwargs.get("db", 0):
            log.warning("shared tier %s is a Redis Cluster, which has only database 0; using it", self.describe())
        tls = self.url.startswith("rediss://")
        cluster = RedisCluster(host=host, port=port, retry=Retry(NoBackoff(), 0), ssl=tls, **{k: v for k, v in opts.items() if k != "ssl"})
        self.cluster = True
        return cluster

    def _on_failure(self, exc: BaseException) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def _close(self) -> None:
        self._on_failure(RuntimeError("closed"))

    # ------------------------------------------------------------------ hooks

    def _chunks(self, n: int, sizes: list[int] | None = None):
        """(start, stop) ranges of at most PIPELINE_BYTES of values."""
        per = max(1, PIPELINE_BYTES // max(1, self.block_bytes or (1 << 20)))
        if sizes is None:
            for i in range(0, n, per):
                yield i, min(n, i + per)
            return
        i = 0
        while i < n:
            j, total = i, 0
            while j < n and (j == i or total + sizes[j] <= PIPELINE_BYTES):
                total += sizes[j]
                j += 1
            yield i, j
            i = j

    def _run(self, keys: list[str], add) -> list[Any]:
        client = self.client()
        out: list[Any] = []
        for i, j in self._chunks(len(keys)):
            pipe = client.pipeline(transaction=False)
            for k in keys[i:j]:
                add(pipe, k)
            out.extend(pipe.execute(raise_on_error=False))
        return out

    def _exists(self, keys: list[str]) -> list[bool]:
        return [r is not None and not isinstance(r, Exception) and bool(r) for r in
                self._run(keys, lambda pipe, k: pipe.exists(k))]

    def _get(self, keys: list[str]) -> list[Any]:
        return [None if isinstance(r, Exception) else r for r in self._run(keys, lambda pipe, k: pipe.get(k))]

    def _put(self, keys: list[str], values: list[list]) -> list[bool]:
        client = self.client()
        sizes = [sum(memoryview(p).nbytes for p in v) for v in values]
        done: list[bool] = []
        full = None
        for i, j in self._chunks(len(keys), sizes):
            pipe = client.pipeline(transaction=False)
            for k, v in zip(keys[i:j], values[i:j]):
                pipe.set(k, b"".join(v), ex=self.ttl_s)
            for r in pipe.execute(raise_on_error=False):
                if isinstance(r, OutOfMemoryError):
                    full = r
                elif isinstance(r, Exception):
                    log.debug("shared tier %s: SET failed: %s", self.describe(), scrub(str(r), self.url))
                done.append(r is True)
        if full is not None and not self._full_warned:
            self._full_warned = True
            log.warning("shared tier %s is full (%s): blocks are not stored; give it an eviction policy, e.g. "
                        "maxmemory-policy allkeys-lru", self.describe(), str(full).split("\n")[0])
        elif full is None and any(done):
            self._full_warned = False
        return done

    def _ping(self) -> None:
        self.client().ping()

    # ------------------------------------------------------------------ doctor

    def server_info(self) -> dict[str, Any]:
        """Version, mode, maxmemory and policy, used memory (raises when unreachable)."""
        client = self.client()
        if self.cluster:
            nodes = client.get_primaries()
            first = client.info(target_nodes=nodes[0]) if nodes else {}
            cfg = client.config_get("maxmemory*", target_nodes=nodes[0]) if nodes else {}
            info = {"mode": f"cluster ({len(nodes)} primaries)", **first}
        else:
            info = {"mode": "single server", **client.info()}
            try:
                cfg = client.config_get("maxmemory*")
            except ResponseError:
                cfg = {}
        return {"mode": info["mode"], "redis_version": info.get("redis_version", "?"),
                "maxmemory": int(cfg.get("maxmemory", info.get("maxmemory", 0)) or 0),
                "maxmemory_policy": cfg.get("maxmemory-policy", info.get("maxmemory_policy", "?")),
                "used_memory": int(info.get("used_memory", 0) or 0)}
