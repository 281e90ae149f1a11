"""Finding a hub id's config.json: in the local Hugging Face cache, else from the hub when the
network allows, within a few seconds either way (huggingface_hub only when needed)."""
from __future__ import annotations

import os
from pathlib import Path


def _hf_cache_dirs() -> list[Path]:
    # huggingface_hub constants: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(home / "hub")
    return dirs


def from_hf_cache(repo_id: str) -> Path | None:
    folder = "models--" + repo_id.replace("/", "--")
    for cache in _hf_cache_dirs():
        snapshots = cache / folder / "snapshots"
        if snapshots.is_dir():
            found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1]
    return None


#: Seconds to reach the hub before a hub id not in the local cache fails: an unreachable
#: hub (no network, a firewall) is one line within 3 s of the command's start (issue 15),
#: not huggingface_hub's five retries with backoff (about 25 s).
HUB_CONNECT_TIMEOUT_S = 2.0
#: Seconds a reachable hub has to deliver a config.json (a few KB) before the command gives up.
HUB_DOWNLOAD_TIMEOUT_S = 10.0
_OFFLINE_VALUES = ("1", "true", "yes", "on")  # huggingface_hub constants._is_true


def _hub_address() -> tuple[str, int, str]:
    """(host, port, what) of the first hop to the hub: the HTTPS proxy if one is set, else
    the endpoint (``HF_ENDPOINT``, default https://huggingface.co)."""
    from urllib.parse import urlsplit
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            url = urlsplit(os.environ[var] if "//" in os.environ[var] else "//" + os.environ[var])
            return url.hostname or "", url.port or 3128, f"the proxy in {var}"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    return url.hostname or "", port, f"{url.hostname}:{port}"


def _within(seconds: float, fn, *args, **kwargs):
    """``(True, fn(...))`` if ``fn`` returns within ``seconds``, ``(False, None)`` if not (it
    runs on in a daemon thread, which cannot be stopped); its exception is re-raised."""
    import threading
    done = threading.Event()
    result: list = []

    def call():
        try:
            result.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result.append((False, exc))
        done.set()

    threading.Thread(target=call, daemon=True).start()
    if not done.wait(seconds):
        return False, None
    ok, value = result[0]
    if not ok:
        raise value
    return True, value


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    """Whether a TCP connection opens within ``timeout_s``, name lookup included
    (``getaddrinfo`` has no timeout of its own, hence the thread)."""
    import socket
    try:
        finished, _ = _within(timeout_s, lambda: socket.create_connection((host, port), timeout=timeout_s).close())
    except (OSError, ValueError):
        return False
    return finished


def download_config(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES:
        raise ValueError(f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                         f"download its config.json or pass a local path")
    host, port, what = _hub_address()
    if not host or not _reachable(host, port, HUB_CONNECT_TIMEOUT_S):
        raise ValueError(f"{repo_id!r} is not in the local Hugging Face cache and the hub is unreachable "
                         f"(no connection to {what} within {HUB_CONNECT_TIMEOUT_S:.0f} s); pass a local "
                         f"config.json or a shipped name")
    import logging
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # no "Retrying in 1s" lines: the error below is the one line
    try:
        from huggingface_hub import hf_hub_download  # lazy: only for hub ids not cached
        finished, path = _within(HUB_DOWNLOAD_TIMEOUT_S, hf_hub_download, repo_id, "config.json",
                                 etag_timeout=HUB_CONNECT_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - network errors, gated repos, unknown repos
        raise ValueError(f"{repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
                         f"({type(exc).__name__}); pass a local config.json or a shipped name") from None
    finally:
        hub_log.setLevel(level)
    if not finished:
        raise ValueError(f"{repo_id!r} is not in the local Hugging Face cache and its config.json did not "
                         f"arrive within {HUB_DOWNLOAD_TIMEOUT_S:.0f} s; pass a local config.json or a shipped name")
    return Path(path)
