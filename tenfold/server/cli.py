"""The `tenfold` command: one CLI, one function per subcommand (later issues add serve, bench and demo)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..adapters import AdapterError, ModelSpec, load_adapter
from ..adapters.checkpoint import read_config


def _base_spec(args, adapter_dir: Path) -> ModelSpec | None:
    """--base, else the adapter's base_model_name_or_path when it is a local directory; else None."""
    if args.base:
        return ModelSpec.from_pretrained(args.base)
    hinted = read_config(adapter_dir).get("base_model_name_or_path")
    if hinted and Path(hinted).is_dir():
        return ModelSpec.from_pretrained(hinted)
    return None


def _load(args):
    directory = Path(args.path)
    return directory, load_adapter(directory, _base_spec(args, directory), lorta_orientation=args.lorta_orientation)


def cmd_inspect(args) -> int:
    from ..adapters.summary import format_summary, summarize

    directory, adapter = _load(args)
    summary = summarize(adapter, directory)
    print(json.dumps(summary, sort_keys=True) if args.json else format_summary(summary, directory))
    return 0


def cmd_convert(args) -> int:
    from ..adapters.convert import convert_to_lora

    directory, adapter = _load(args)
    if adapter.spec is None:
        raise AdapterError(f"{directory}: converting needs the base model's shapes: pass --base MODEL_DIR")
    out = convert_to_lora(adapter, args.out, base_model=args.base)
    print(f"wrote PEFT LoRA (rank {adapter.rank}, exact) to {out}")
    return 0


def cmd_serve(args, passthrough) -> int:
    from .serve import run

    return run(args, passthrough)


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

    from .serve import add_arguments

    serve = commands.add_parser("serve", help="serve a base model and its adapters (OpenAI-compatible HTTP)",
                                description="Arguments not listed here are passed to vLLM's engine and server.")
    add_arguments(serve)
    serve.set_defaults(run=cmd_serve, passthrough=True)
    return parser


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args, rest) if getattr(args, "passthrough", False) else args.run(args)
    except (AdapterError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"tenfold: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
