"""Starts a cluster: Ray (local, or an existing cluster by address), the registry actor, N engine replicas and the
ingress on Ray Serve's HTTP proxy; runs until SIGINT/SIGTERM, then shuts Serve down (each replica stops its engine's
process group) and stops the engine process groups that are still running (Serve's controller may not finish its
shutdown in time)."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path

from .process_group import stop_group
from .registry import REGISTRY_NAME, REGISTRY_NAMESPACE, ClusterRegistry

# what the replicas' engines read from the environment (the Ray workers that host them do not inherit the shell's)
FORWARDED_ENV_PREFIXES = ("VLLM_", "TENFOLD_", "HF_", "OMP_", "TRANSFORMERS_")
# Serve's multiplexed matching timeout (ray.serve._private.constants), read when Serve is imported in a worker
AFFINITY_TIMEOUT_ENV = "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S"
# a replica's stop: Serve's drain of its requests, then the engine's (replica.STOP_GRACE_SECONDS, then SIGKILL)
REPLICA_SHUTDOWN_SECONDS = 60
LEFTOVER_GRACE_SECONDS = 10  # engines still running after Serve's shutdown: SIGTERM, then SIGKILL


def replica_argv(args, passthrough: list[str]) -> list[str]:
    """The single-engine `tenfold serve` arguments every replica runs with (host, ports and cluster flags are the
    replica's own)."""
    argv = [args.model, "--mode", args.mode]
    for spec in args.adapter:
        argv += ["--adapter", spec]
    if args.adapter_root is not None:
        argv += ["--adapter-root", str(args.adapter_root.resolve())]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    if args.protect_all:
        argv += ["--protect-all"]
    if args.adapter_memory is not None:
        argv += ["--adapter-memory", repr(args.adapter_memory)]
    for name in args.pin:
        argv += ["--pin", name]
    return argv + passthrough


def engine_cache_size(passthrough: list[str], default: str) -> int:
    """The engine's host adapter cache (--max-cpu-loras): Serve's per-replica adapter count is set to it, so that
    Serve's evictions, not the engine's, decide what a replica holds and routing knows it."""
    for i, arg in enumerate(passthrough):
        if arg.startswith("--max-cpu-loras="):
            return int(arg.split("=", 1)[1])
        if arg == "--max-cpu-loras" and i + 1 < len(passthrough):
            return int(passthrough[i + 1])
    return int(default)


TLS_FLAGS = ("--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--ssl-cert-reqs", "--grpc-tls-cert", "--grpc-tls-key")


def refuse_tls(args, passthrough: list[str]) -> None:
    """The cluster's front doors are Ray Serve's HTTP and gRPC proxies, which this launcher starts without TLS: a TLS
    flag is refused rather than served in plaintext."""
    given = [flag for flag in TLS_FLAGS
             if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None
             or any(a == flag or a.startswith(flag + "=") for a in passthrough)]
    if given:
        raise SystemExit(f"tenfold serve --replicas: {', '.join(given)}: the cluster's HTTP and gRPC front doors (Ray "
                         f"Serve's proxies) serve without TLS; terminate TLS in front of them (a load balancer or a "
                         f"reverse proxy), or serve one engine without --replicas")


def run(args, passthrough: list[str]) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("tenfold serve --replicas needs Ray Serve: pip install 'tenfold[ray]'") from None

    from ..server.serve import ENGINE_DEFAULTS
    from .ingress import ingress_class
    from .replica import replica_class

    if args.adapter_root is not None and not args.adapter_root.is_dir():
        raise SystemExit(f"tenfold serve: --adapter-root {args.adapter_root} is not a directory")
    refuse_tls(args, passthrough)
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    if args.affinity_timeout < 0:
        raise SystemExit(f"tenfold serve: --affinity-timeout {args.affinity_timeout}: must be >= 0 seconds")
    # read by Serve's request router, which runs in the ingress replica: a Ray worker of this job
    env[AFFINITY_TIMEOUT_ENV] = repr(args.affinity_timeout)
    ray.init(address=args.ray_address, namespace=REGISTRY_NAMESPACE, runtime_env={"env_vars": env},
             include_dashboard=False, log_to_driver=False)
    log_dir = Path(args.replica_log_dir or tempfile.mkdtemp(prefix="tenfold-cluster-"))
    registry = ray.remote(ClusterRegistry).options(name=REGISTRY_NAME, num_cpus=0).remote(list(args.pin))
    max_adapters = engine_cache_size(passthrough, ENGINE_DEFAULTS["--max-cpu-loras"])
    engines = serve.deployment(
        replica_class(max_adapters), name="tenfold-engine", num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.replica_cpus}, max_ongoing_requests=args.replica_max_ongoing,
        health_check_period_s=2, health_check_timeout_s=60, graceful_shutdown_timeout_s=REPLICA_SHUTDOWN_SECONDS)
    ingress = serve.deployment(
        ingress_class(args.api_key, args.protect_all, not args.no_affinity, REGISTRY_NAME), name="tenfold-ingress",
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
    grpc_options = None
    if args.grpc_port:  # tenfold's gRPC API on Serve's gRPC proxy, in front of the replicas' own gRPC servers
        from .grpc_ingress import SERVICER_FUNCTION

        grpc_options = {"port": args.grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    serve.start(http_options={"host": args.host, "port": args.port}, grpc_options=grpc_options)
    # a Ray started here runs on this machine only: the engines listen on loopback (else each on its node's address)
    local = args.ray_address is None
    app = ingress.bind(engines.bind(replica_argv(args, passthrough), args.api_key, local, str(log_dir), REGISTRY_NAME))
    serve.run(app, name="tenfold", route_prefix="/")
    routing = "off" if args.no_affinity else f"on, matching timeout {args.affinity_timeout:g}-{2 * args.affinity_timeout:g} s"
    grpc_address = f" and gRPC {args.host}:{args.grpc_port}" if args.grpc_port else ""
    print(f"tenfold cluster: {args.replicas} engine replicas behind http://{args.host}:{args.port}{grpc_address} "
          f"(affinity {routing}; engine logs in {log_dir})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    try:
        serve.shutdown()
    finally:
        stop_leftover_engines(registry)
    ray.kill(registry)
    ray.shutdown()
    return 0


def stop_leftover_engines(registry) -> None:
    """Stops the engine process groups that the replicas did not stop (the registry lists each until its replica has
    stopped it): on this node directly, on another node by a task placed there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    by_node: dict[str, list[int]] = {}
    for node_id, pgid in ray.get(registry.engines.remote()).values():
        by_node.setdefault(node_id, []).append(pgid)
    here = ray.get_runtime_context().get_node_id()
    remote = []
    for node_id, pgids in by_node.items():
        if node_id == here:
            stop_groups(pgids)
        else:
            placed = NodeAffinitySchedulingStrategy(node_id, soft=False)
            remote.append(ray.remote(stop_groups).options(num_cpus=0, scheduling_strategy=placed).remote(pgids))
    try:
        ray.get(remote, timeout=LEFTOVER_GRACE_SECONDS + 60)
    except (ray.exceptions.RayError, TimeoutError) as e:  # a node that is gone took its engines with it
        print(f"tenfold cluster: stopping the engines on other nodes: {e}", flush=True)


def stop_groups(pgids: list[int]) -> None:
    threads = [threading.Thread(target=stop_group, args=(pgid, LEFTOVER_GRACE_SECONDS)) for pgid in pgids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
