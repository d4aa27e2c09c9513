"""The `raffm` command line: one entry point, sub-commands contributed by each component.

Each component module exposes ``register(subparsers)`` that adds its sub-command and sets ``func`` on the parser;
heavy imports happen inside ``func`` so ``raffm --help`` stays fast. The services and the agent contribute their own
commands; this package adds ``extract``/``inspect`` and ``demo``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Modules that contribute sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "raffm_app.extract",
    "services.registry.cli",
    "services.extractor.cli",
    "services.aggregator.cli",
    "edge_agent.cli",
    "raffm_app.demo",
)


def wire_dtype_arg(value: str) -> str:
    """An argparse ``type``: a wire dtype name or alias, normalised (imports torch only when the flag is parsed)."""
    from raffm.wire import wire_dtype_name

    return wire_dtype_name(value)


def strategy_arg(value: str) -> str:
    """An argparse ``type``: the name of a :mod:`raffm.strategy` preset (imported, with torch, only when the flag is
    parsed: building the parser must stay cheap, every `raffm` command builds all of it)."""
    from raffm.strategy import strategy_named

    try:
        strategy_named(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raffm",
        description="RaFFM: resource-aware federated fine-tuning of transformer foundation models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not a component that is not built yet
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # transformers' load reports and weight-loading bars are noise for a command-line user.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # domain validation errors carry a message that says what to fix
        print(f"raffm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
