"""Run the checks against a back-end, each on a fresh connection, and judge its survival.

Discovery first (reported as the ``get-features`` line): GET_FEATURES, and GET_PROTOCOL_FEATURES
when bit 30 is offered, on a connection of its own. Then every check in order: n/a when the
back-end does not offer what it needs; otherwise it runs on a new connection, that connection is
closed, and another new connection must get GET_FEATURES answered (the back-end survived). A
check whose back-end did not survive fails. Once the back-end stops answering, the remaining
checks are not run (n/a, not survived).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvhost.check.cases import CHECKS, Check
from pyvhost.check.session import Offer, Outcome, Result, Session, failed, passed
from pyvhost.errors import VhostError
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import F_PROTOCOL_FEATURES

__all__ = ["DISCOVERY", "CheckResult", "Report", "alive", "run_checks"]

log = logging.getLogger(__name__)

DISCOVERY = ("get-features", "Front-end message types / VHOST_USER_GET_FEATURES")
"""Name and clause of the discovery line."""


@dataclass(frozen=True)
class CheckResult:
    """One line of the report."""

    name: str
    clause: str
    result: Result
    survived: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "clause": self.clause,
            "result": self.result,
            "survived": self.survived,
            "detail": self.detail,
        }

    def to_text(self) -> str:
        state = "-" if self.result == "n/a" else "survived" if self.survived else "DIED"
        return f"{self.result:<4}  {state:<8}  {self.name:<26}  [{self.clause}]  {self.detail}"


@dataclass
class Report:
    """Every check's line, in order."""

    socket: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(1 for c in self.checks if c.result == "pass")

    @property
    def failed(self) -> int:
        return sum(1 for c in self.checks if c.result == "fail")

    @property
    def survived_all(self) -> bool:
        return all(c.survived for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.survived_all

    def to_json(self) -> dict[str, Any]:
        return {
            "checks": [c.to_json() for c in self.checks],
            "passed": self.passed,
            "failed": self.failed,
            "survived_all": self.survived_all,
        }

    def to_text(self) -> str:
        lines = [f"pyvhost check {self.socket}"]
        lines += [c.to_text() for c in self.checks]
        na = len(self.checks) - self.passed - self.failed
        summary = f"{self.passed} passed, {self.failed} failed, {na} n/a"
        died = [c.name for c in self.checks if not c.survived and c.result != "n/a"]
        if died:
            summary += f"; the back-end stopped answering after {died[0]}"
        else:
            summary += "; the back-end survived every check"
        lines.append(summary)
        return "\n".join(lines)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def alive(path: str, timeout: float) -> str | None:
    """None when a fresh connection gets GET_FEATURES answered within ``timeout``; else why not."""
    try:
        with Frontend.connect(path, deadline=timeout, reply_timeout=timeout) as fe:
            fe.get_features()
    except (VhostError, OSError) as exc:
        return _describe(exc)
    return None


def _discover(path: str, timeout: float) -> tuple[Offer | None, Outcome]:
    try:
        with Frontend.connect(path, deadline=timeout, reply_timeout=timeout) as fe:
            features = fe.get_features()
            protocol = None
            if features >> F_PROTOCOL_FEATURES & 1:
                protocol = fe.get_protocol_features()
    except (VhostError, OSError) as exc:
        return None, failed(_describe(exc))
    detail = f"features {features:#x}"
    if protocol is None:
        detail += "; no protocol features (bit 30 not offered)"
    else:
        detail += f"; protocol features {protocol:#x}"
    return Offer(features, protocol), passed(detail)


def _run_one(check: Check, path: str, offer: Offer, timeout: float) -> Outcome:
    try:
        with Session(path, offer, timeout) as session:
            return check.run(session)
    except (VhostError, OSError) as exc:
        log.debug("%s: %s", check.name, exc, exc_info=True)
        return failed(_describe(exc))
    except Exception as exc:
        # The report must reach the end whatever a back-end does; say it was not the back-end.
        log.exception("check %s: internal error", check.name)
        return failed(f"internal error in the check (not the back-end's): {_describe(exc)}")


def _missing(check: Check, offer: Offer) -> str | None:
    missing = [need.name for need in check.needs if not need.met(offer)]
    if not missing:
        return None
    return "not offered by the back-end: " + ", ".join(missing)


def _with_survival(
    name: str, clause: str, outcome: Outcome, path: str, timeout: float
) -> CheckResult:
    why = alive(path, timeout)
    if why is None:
        return CheckResult(name, clause, outcome.result, True, outcome.detail)
    detail = f"{outcome.detail}; then a fresh connection got no GET_FEATURES answer: {why}"
    return CheckResult(name, clause, "fail", False, detail)


def run_checks(path: str, *, timeout: float = 5.0, checks: Sequence[Check] = CHECKS) -> Report:
    """Discovery, then every check in ``checks``; see the module docstring."""
    report = Report(path)
    offer, outcome = _discover(path, timeout)
    first = _with_survival(*DISCOVERY, outcome, path, timeout)
    report.checks.append(first)
    dead = None if first.survived else first.name
    for check in checks:
        if dead is not None or offer is None:
            why = f"not run: the back-end stopped answering after {dead}"
            if offer is None and dead is None:
                why = "not run: discovery failed"
            report.checks.append(CheckResult(check.name, check.clause, "n/a", dead is None, why))
            continue
        missing = _missing(check, offer)
        if missing is not None:
            report.checks.append(CheckResult(check.name, check.clause, "n/a", True, missing))
            continue
        log.info("check %s", check.name)
        result = _with_survival(
            check.name, check.clause, _run_one(check, path, offer, timeout), path, timeout
        )
        report.checks.append(result)
        if not result.survived:
            dead = check.name
    return report
