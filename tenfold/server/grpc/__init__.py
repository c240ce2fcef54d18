"""tenfold's gRPC API (tenfold.proto), compiled at import by grpcio-tools, served on the HTTP server's engine."""

import sys
from http import HTTPStatus
from pathlib import Path

import grpc

PROTO = Path(__file__).with_name("tenfold.proto")
_IMPORT_ROOT = PROTO.parents[3]  # the directory holding the `tenfold` package
# tenfold's admin errors carry HTTP statuses; gRPC answers them with these codes (single engine and cluster alike)
STATUS_TO_CODE = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT, HTTPStatus.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND, HTTPStatus.CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.TOO_MANY_REQUESTS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def load_protos():
    """(messages module, services module) for tenfold.proto. grpc looks the .proto up on sys.path; an editable
    install does not put the package's root there, so add it."""
    if str(_IMPORT_ROOT) not in sys.path:
        sys.path.append(str(_IMPORT_ROOT))
    return grpc.protos_and_services(str(PROTO.relative_to(_IMPORT_ROOT)))
