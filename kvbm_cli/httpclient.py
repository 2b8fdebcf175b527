"""The one HTTP client of the toolkit (httpx): engines' health and models, /metrics text, streaming requests.

Operations:
  get(url, timeout) / healthy(base_url)   GET (httpx.HTTPError unless 2xx) / True when GET /health answers 200
  server_model(base_url)                  (id, root) of the server's first model: its served name, what it loaded
  metrics_url(url)                        a /metrics URL (added to a base URL)
  async_client(concurrency, timeout)      an AsyncClient sized for `concurrency` streams
"""

from __future__ import annotations

import httpx

from kvbm_cli._errors import CliError

HTTPError = httpx.HTTPError


def get(url: str, timeout: float = 10.0, **params) -> httpx.Response:
    """GET `url`; httpx.HTTPError on a connection failure or a status that is not 2xx."""
    return httpx.get(url, timeout=timeout, params=params or None).raise_for_status()


def healthy(base_url: str, timeout: float = 2.0) -> bool:
    try:
        return get(base_url.rstrip("/") + "/health", timeout).status_code == 200
    except (httpx.HTTPError, OSError):
        return False


def server_model(base_url: str, timeout: float = 10.0) -> tuple[str, str]:
    """(id, root) of the first model GET /v1/models lists; CliError (exit 1) when no server answers."""
    try:
        card = get(base_url.rstrip("/") + "/v1/models", timeout).json()["data"][0]
        return card["id"], card.get("root") or card["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise CliError(f"no OpenAI-compatible server at {base_url} ({type(exc).__name__}: {exc}); start one with "
                       "`kvbm serve` or pass --url", code=1) from None


def metrics_url(url: str) -> str:
    """'http://h:8000' or 'h:8000' -> 'http://h:8000/metrics'; a URL with a path is kept as given."""
    url = httpx.URL(url if "://" in url else "http://" + url)
    return str(url.copy_with(path="/metrics" if url.path == "/" else url.path))


def async_client(concurrency: int, timeout_s: float) -> httpx.AsyncClient:
    """An AsyncClient with room for `concurrency` streams (and a few more connections)."""
    n = max(concurrency, 1) + 4
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0),
                             limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
