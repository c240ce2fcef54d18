"""`tenfold serve`: one process serving vLLM's OpenAI-compatible HTTP API with the tenfold plugin active,
tenfold's adapter admin routes and the gRPC API, all on one engine. Unrecognised arguments go to vLLM's own
engine/server parser. SIGTERM drains: the engine finishes in-flight requests (up to --shutdown-timeout), then HTTP
and gRPC stop, each with a bounded grace period so that no connection can hold the process open."""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

from ..engine.adapter_memory import ENV as MEMORY_ENV, parse_gib
from ..engine.mode import ENV as MODE_ENV
from ..engine.mode import MODES
from ..engine.resolver import ROOT_ENV, InvalidAdapterName, adapter_path
from .adapter_admin import AdapterAdmin, AdminError, ServeSettings
from .admin_routes import install

GRPC_GRACE_SECONDS = 10
HTTP_GRACE_SECONDS = 10

# engine defaults for multi-adapter serving (vLLM's own default is one LoRA slot; its default shutdown aborts
# in-flight requests, and a stream whose abort races the output handler's cancellation never ends); explicit flags win
ENGINE_DEFAULTS = {"--max-loras": "16", "--max-lora-rank": "64", "--max-cpu-loras": "64", "--shutdown-timeout": "20"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="base model: a HuggingFace directory (or hub id when online)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve an adapter from start-up (repeatable); PATH may be outside --adapter-root")
    parser.add_argument("--pin", action="append", default=[], metavar="NAME",
                        help="pin an adapter (a --adapter name or one under --adapter-root) from start-up: loaded and "
                             "never evicted from the workers' cache (repeatable; at most --max-cpu-loras minus "
                             "--max-loras)")
    parser.add_argument("--adapter-root", type=Path, help="directory whose sub-directories load by name on first use")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port on --host (0: no gRPC server)")
    parser.add_argument("--api-key", help="the key (HTTP Authorization: Bearer KEY, gRPC metadata authorization) every "
                                          "route needs except health (/health, /ping; gRPC health) and, unless "
                                          "--protect-all, serving (completions, chat completions, /v1/models, "
                                          "/tokenize, /detokenize, /metrics; gRPC Generate, GenerateStream, "
                                          "ListAdapters): adapter admin and every other route need it "
                                          "(tenfold/server/access.py lists the open routes)")
    parser.add_argument("--protect-all", action="store_true",
                        help="with --api-key: serving routes need the key too (only health stays open)")
    parser.add_argument("--grpc-tls-cert", type=Path, metavar="PEM",
                        help="serve gRPC over TLS with this certificate chain (with --grpc-tls-key; HTTP takes vLLM's "
                             "--ssl-certfile/--ssl-keyfile)")
    parser.add_argument("--grpc-tls-key", type=Path, metavar="PEM", help="the private key of --grpc-tls-cert")
    parser.add_argument("--mode", choices=MODES, default=os.environ.get(MODE_ENV, "native"),
                        help="execution path: native (tenfold's factorized kernels, every family; the default) or "
                             "convert (exactly-low-rank families as LoRA on vLLM's kernels); sets TENFOLD_MODE")
    parser.add_argument("--adapter-memory", type=parse_gib, metavar="GIB",
                        help="native mode: device memory reserved at start-up for every adapter's slot tables and "
                             "frozen-weight copies (default: twice what vLLM's LoRA reserves for --max-loras and "
                             "--max-lora-rank, at least 0.5); a load that does not fit is refused; sets "
                             "TENFOLD_ADAPTER_MEMORY")
    cluster = parser.add_argument_group("replicas on Ray Serve (the ray extra)")
    cluster.add_argument("--replicas", type=int, default=0, metavar="N",
                         help="run N engines as Ray Serve replicas behind one ingress on --host/--port, requests "
                              "routed to a replica that holds their adapter (default 0: one engine in this process)")
    cluster.add_argument("--ray-address", help="an existing Ray cluster (default: start Ray on this machine)")
    cluster.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs each replica reserves (default 1)")
    cluster.add_argument("--replica-max-ongoing", type=int, default=64, metavar="N",
                         help="requests Serve sends one replica at once: its engine batches them (default 64)")
    cluster.add_argument("--affinity-timeout", type=float, default=1.0, metavar="S",
                         help="how long Serve looks for a replica that holds a request's adapter before it sends the "
                              "request to the replica holding the fewest adapters; Serve draws each wait between S "
                              "and 2S (default 1.0, Serve's own)")
    cluster.add_argument("--no-affinity", action="store_true",
                         help="route requests to any replica (each loads what it is asked for); for comparison")
    cluster.add_argument("--replica-log-dir", help="each replica's engine log (default: a new temporary directory)")


def static_adapters(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise SystemExit(f"tenfold serve: --adapter expects NAME=PATH, got {spec!r}")
        try:
            adapter_path(Path("/"), name)  # name rules only
        except InvalidAdapterName as e:
            raise SystemExit(f"tenfold serve: {e}") from None
        if not Path(path).is_dir():
            raise SystemExit(f"tenfold serve: adapter {name!r}: {path} is not a directory")
        pairs.append((name, str(Path(path).resolve())))
    return pairs


def vllm_argv(args, passthrough: list[str]) -> list[str]:
    argv = ["--model", args.model, "--host", args.host, "--port", str(args.port), "--enable-lora"]
    for flag, value in ENGINE_DEFAULTS.items():
        if not any(a == flag or a.startswith(flag + "=") for a in passthrough):
            argv += [flag, value]
    adapters = static_adapters(args.adapter)
    if adapters:
        argv += ["--lora-modules", *[f"{n}={p}" for n, p in adapters]]
    return argv + passthrough  # the key is tenfold's (access.py), not vLLM's --api-key, which guards only some prefixes


def grpc_tls(args) -> tuple[bytes, bytes] | None:
    """(certificate chain, private key) as PEM bytes for the gRPC server, checked now: both flags or neither, readable
    files that hold a certificate and its private key."""
    import ssl

    cert, key = getattr(args, "grpc_tls_cert", None), getattr(args, "grpc_tls_key", None)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise SystemExit("tenfold serve: --grpc-tls-cert and --grpc-tls-key go together (a certificate chain and its "
                         f"private key, PEM); got only {'--grpc-tls-cert' if key is None else '--grpc-tls-key'}")
    try:
        pems = cert.read_bytes(), key.read_bytes()
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as e:  # before OSError, its base class
        raise SystemExit(f"tenfold serve: --grpc-tls-cert {cert} / --grpc-tls-key {key}: not a PEM certificate chain "
                         f"and its private key ({e.reason or e})") from None
    except OSError as e:
        raise SystemExit(f"tenfold serve: --grpc-tls-cert {cert} / --grpc-tls-key {key}: {e}") from None
    return pems


def run(args, passthrough: list[str]) -> int:
    """One engine in this process (`tenfold serve` without --replicas)."""
    tls = grpc_tls(args)
    if args.adapter_root is not None:
        if not args.adapter_root.is_dir():
            raise SystemExit(f"tenfold serve: --adapter-root {args.adapter_root} is not a directory")
        os.environ[ROOT_ENV] = str(args.adapter_root.resolve())
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # load/unload at runtime, resolver on first use
    os.environ[MODE_ENV] = args.mode  # read by every vLLM process the engine spawns
    if args.adapter_memory is not None:
        os.environ[MEMORY_ENV] = repr(args.adapter_memory)

    from ..engine.plugin import register

    register()
    vllm_args = vllm_serve_args(args, passthrough)
    import uvloop

    uvloop.run(_serve(vllm_args, serve_settings(args), args.grpc_port, args.pin, tls))
    return 0


def vllm_serve_args(args, passthrough: list[str]):
    """vLLM's parsed server arguments for these `tenfold serve` arguments."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_args = make_arg_parser(FlexibleArgumentParser(prog="tenfold serve")).parse_args(vllm_argv(args, passthrough))
    validate_parsed_serve_args(vllm_args)
    return vllm_args


def serve_settings(args) -> ServeSettings:
    return ServeSettings(api_key=args.api_key, protect_all=args.protect_all,
                         adapter_root=args.adapter_root.resolve() if args.adapter_root else None)


async def _serve(vllm_args, settings: ServeSettings, grpc_port: int, pins: list[str],
                 tls: tuple[bytes, bytes] | None) -> None:
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    from . import metrics

    listen_address, sock = setup_server(vllm_args, reuse_port=False)
    async with build_async_engine_client(vllm_args) as engine_client:
        facts_of = _instrument(engine_client)
        tasks = await engine_client.get_supported_tasks()
        app = build_app(vllm_args, tasks, engine_client.model_config)
        await init_app_state(engine_client, app.state, vllm_args, tasks)
        admin = AdapterAdmin(app.state, settings, facts_of)
        install(app, admin, metrics.ResidencyTracker(admin))
        for name in pins:
            try:
                await admin.pin(name)
            except AdminError as e:
                raise SystemExit(f"tenfold serve: --pin {name}: {e}") from None
        grpc_server = None
        if grpc_port:
            from .grpc.servicer import start

            grpc_server = await start(admin, vllm_args.host, grpc_port, tls)
        shutdown = await serve_http(app, sock=sock, host=vllm_args.host, port=vllm_args.port,
                                    log_level=vllm_args.uvicorn_log_level,
                                    access_log=not vllm_args.disable_uvicorn_access_log,
                                    timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
                                    timeout_graceful_shutdown=HTTP_GRACE_SECONDS, **http_transport(vllm_args))
        try:
            await shutdown
        finally:
            sock.close()
            if grpc_server is not None:
                await grpc_server.stop(GRPC_GRACE_SECONDS)


def http_transport(vllm_args) -> dict:
    """vLLM's own HTTP transport flags, as vLLM's server hands them to uvicorn: TLS (--ssl-keyfile, --ssl-certfile,
    --ssl-ca-certs, --ssl-cert-reqs, --ssl-ciphers, --enable-ssl-refresh) and the h11 header limits."""
    names = ("enable_ssl_refresh", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_cert_reqs", "ssl_ciphers",
             "h11_max_incomplete_event_size", "h11_max_header_count")
    return {name: getattr(vllm_args, name) for name in names}


def _instrument(engine_client):
    """Hook tenfold's metrics into this engine client; returns the adapter facts it labels them with (path -> the
    `recorded_facts` of its current version for this engine's served model and tensor-parallel size, or None when
    this process has not validated that version: never a load)."""
    from vllm.sampling_params import RequestOutputKind

    from ..adapters.spec import served_spec
    from ..engine.loader import recorded_facts
    from . import metrics
    from .instrument import instrument_engine_client

    spec = served_spec(engine_client.vllm_config.model_config.hf_config)
    tensor_parallel_size = engine_client.vllm_config.parallel_config.tensor_parallel_size
    facts_of = functools.partial(recorded_facts, spec=spec, tensor_parallel_size=tensor_parallel_size)
    instrument_engine_client(
        engine_client,
        on_request=lambda lora, params: metrics.RequestTracker(lora, facts_of,
                                                               params.output_kind == RequestOutputKind.DELTA),
        on_load=lambda lora: metrics.LoadTracker(lora, facts_of),
        on_unload=metrics.note_unload)
    return facts_of
