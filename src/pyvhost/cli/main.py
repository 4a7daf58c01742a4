"""The ``pyvhost`` command: one argparse sub-command per tool module.

A tool module exposes ``register(subparsers) -> None``, which adds its sub-parser, and
``run(args) -> int``, which runs the sub-command and returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from pyvhost import __version__

log = logging.getLogger(__name__)

#: Tool modules, in ``--help`` order. Later tools (serve, exercise, demo) are added here.
TOOL_MODULES: tuple[str, ...] = (
    "pyvhost.cli.serve",
    "pyvhost.cli.probe",
    "pyvhost.cli.check",
    "pyvhost.cli.trace",
    "pyvhost.cli.exercise",
    "pyvhost.cli.demo",
)

RunFunc = Callable[[argparse.Namespace], int]


def _load_tool(name: str) -> ModuleType | None:
    """Import a tool module; one that does not exist (yet) is skipped, other errors raise."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        log.debug("tool module %s is not available", name)
        return None


def build_parser(tool_modules: Sequence[str] = TOOL_MODULES) -> argparse.ArgumentParser:
    """Build the top-level parser and let every available tool module register its sub-command."""
    parser = argparse.ArgumentParser(
        prog="pyvhost", description="vhost and vhost-user tools: probe, trace, ..."
    )
    parser.add_argument("--version", action="version", version=f"pyvhost {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more to stderr (-v: info, -vv: debug)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in tool_modules:
        module = _load_tool(name)
        if module is None:
            continue
        before = set(subparsers.choices)
        module.register(subparsers)
        run: RunFunc = module.run
        for command in set(subparsers.choices) - before:
            subparsers.choices[command].set_defaults(_run=run)
    return parser


def configure_logging(verbosity: int) -> None:
    """Log to stderr with timestamps; verbosity 0 shows warnings, 1 info, 2 and more debug."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyvhost`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: RunFunc | None = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    configure_logging(args.verbose)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
