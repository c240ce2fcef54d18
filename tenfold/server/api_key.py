"""The API key check every front end shares (HTTP, gRPC, the cluster's ingress): constant-time, so the time a wrong
key takes to refuse does not tell how much of it was right."""

from __future__ import annotations

import hmac


def bearer_key_matches(authorization: str | None, key: str) -> bool:
    """Whether an `Authorization` value (HTTP header or gRPC metadata) carries `Bearer <key>`."""
    supplied = (authorization or "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(supplied.encode(), key.encode())
