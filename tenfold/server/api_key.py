"""The API key check every front end shares (HTTP, gRPC, the cluster's ingress): constant-time, so the time a wrong
key takes to refuse does not tell how much of it was right."""

from __future__ import annotations

import hmac


def bearer_key_matches(authorization: str | None, key: str) -> bool:
    """Whether an `Authorization` value (HTTP header or gRPC metadata) is `Bearer <key>` (the scheme is required,
    in any case, as RFC 9110 has it)."""
    scheme, _, supplied = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(supplied.strip().encode(), key.encode())
