"""Fail fast instead of hanging when something needs a download and there is no network."""

from __future__ import annotations

import os
import socket
from functools import lru_cache


@lru_cache(maxsize=None)
def network_available(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("QTRAIN_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_network(what: str, key: str, host: str = "huggingface.co") -> None:
    """Raise a one-line error naming the config ``key`` to point at local files."""
    if not network_available(host):
        raise FileNotFoundError(
            f"{what} needs a download from {host} and there is no network; "
            f"set {key}=/path/to/local/files instead"
        )
