"""The ``ferrytune`` command line.

    ferrytune train [CONFIG.yaml] [--set section.key=value ...] [--ray [--address ADDR]]
    ferrytune eval CONFIG.yaml [--checkpoint DIR] [--output FILE.json]
    ferrytune plan CONFIG.yaml
    ferrytune replay CONFIG.yaml --log OUTPUT_DIR/zo_log.jsonl
    ferrytune serve | tenants | submit | jobs | status | cancel | fetch   (the LoRA service)

``ferrytune train`` with no config runs the embedded demo (a tiny model built
on the spot and a packaged dataset). Errors print one line and exit non-zero;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ferrytune.errors import FerrytuneError
from ferrytune.launch._logging import setup_logging

logger = logging.getLogger("ferrytune")


def _add_config_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    if optional:
        p.add_argument("config", nargs="?", help="YAML config (omit for the embedded demo)")
    else:
        p.add_argument("config", help="YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferrytune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune a model (zo or lora)")
    _add_config_args(p, optional=True)
    p.add_argument("--ray", action="store_true", help="start the ranks with Ray Train instead of torchrun")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    p = sub.add_parser("eval", help="evaluate a model or checkpoint on data.eval")
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None, help="HF folder to evaluate (default: model.path)")
    p.add_argument("--output", default=None, metavar="FILE.json",
                   help="also write the result to this JSON file (atomically); nothing else is written")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    p = sub.add_parser("replay", help="rebuild a ZO run's weights from its initial weights and zo_log.jsonl")
    _add_config_args(p)
    p.add_argument("--log", required=True, help="the run's zo_log.jsonl")
    p.add_argument("--to-step", type=int, default=None, help="stop after this many steps")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    p = sub.add_parser("plan", help="print the placement plan and memory estimate, without training")
    _add_config_args(p)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    try:
        from ferrytune.service.cli import add_service_subcommands
    except ImportError:  # the service needs its optional dependencies
        add_service_subcommands = None
    if add_service_subcommands is not None:
        add_service_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    setup_logging(debug)
    try:
        return int(_dispatch(args) or 0)
    except FerrytuneError as e:
        if debug:
            raise
        print(f"ferrytune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ferrytune: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int | None:
    from ferrytune.launch import _commands

    if args.command == "train":
        return _commands.train_command(args)
    if args.command == "eval":
        return _commands.eval_command(args)
    if args.command == "plan":
        return _commands.plan_command(args)
    if args.command == "replay":
        return _commands.replay_command(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
