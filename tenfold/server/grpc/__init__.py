"""tenfold's gRPC API (tenfold.proto), compiled at import by grpcio-tools, served on the HTTP server's engine."""

import sys
from pathlib import Path

import grpc

PROTO = Path(__file__).with_name("tenfold.proto")
_IMPORT_ROOT = PROTO.parents[3]  # the directory holding the `tenfold` package


def load_protos():
    """(messages module, services module) for tenfold.proto. grpc looks the .proto up on sys.path; an editable
    install does not put the package's root there, so add it."""
    if str(_IMPORT_ROOT) not in sys.path:
        sys.path.append(str(_IMPORT_ROOT))
    return grpc.protos_and_services(str(PROTO.relative_to(_IMPORT_ROOT)))
