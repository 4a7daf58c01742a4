"""``pyvhost check``: conformance and robustness of any vhost-user back-end.

Connects as a front-end, runs every check of :mod:`pyvhost.check.cases` on its own connection
(negotiation, memory and rings, hostile input) and after each one makes sure, on a fresh
connection, that the back-end still answers. One line per check: result, survival, name, the
clause of QEMU's ``vhost-user.rst`` it enforces, and what happened. Exit status 1 on any failure
or death, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json

from pyvhost.check import CHECKS, Check, run_checks

__all__ = ["register", "run"]


def _timeout(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("timeout must be positive")
    return value


def _check_name(text: str) -> str:
    if text not in {c.name for c in CHECKS}:
        names = ", ".join(c.name for c in CHECKS)
        raise argparse.ArgumentTypeError(f"no check named {text!r} (checks: {names})")
    return text


def selected(only: list[str] | None, skip: list[str] | None) -> list[Check]:
    """The checks to run, in table order: ``only`` those named (all if None), minus ``skip``."""
    return [c for c in CHECKS if (only is None or c.name in only) and c.name not in (skip or [])]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``check`` sub-command."""
    parser = subparsers.add_parser(
        "check",
        help="conformance and robustness checks of a vhost-user back-end",
        description="Run conformance checks (negotiation, memory, rings) and hostile-input checks "
        "against a vhost-user back-end; after each, check on a fresh connection that it still "
        "answers. The back-end must accept one front-end after another (it is sent memory "
        "tables and rings, so do not point this at a back-end serving a guest).",
    )
    parser.add_argument("--socket", required=True, metavar="PATH", help="back-end's Unix socket")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=5.0,
        metavar="S",
        help="seconds to wait for the socket and for every reply (default 5)",
    )
    parser.add_argument(
        "--only",
        action="append",
        type=_check_name,
        metavar="NAME",
        help="run only this check (repeatable; get-features always runs)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        type=_check_name,
        metavar="NAME",
        help="leave this check out (repeatable), e.g. one that kills the back-end",
    )


def run(args: argparse.Namespace) -> int:
    """Run every check and print the report; 1 if any check failed or the back-end died."""
    checks = selected(args.only, args.skip)
    report = run_checks(args.socket, timeout=args.timeout, checks=checks)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.to_text())
    return 0 if report.ok else 1
