"""Conformance and robustness checks for any vhost-user back-end (``pyvhost check``).

:mod:`.cases` is the table of checks, :mod:`.session` what each check talks through (a fresh
connection, our own codec and Frontend), :mod:`.runner` runs them and judges survival.
"""

from __future__ import annotations

from pyvhost.check.cases import CHECKS, Check, Need
from pyvhost.check.runner import CheckResult, Report, alive, run_checks
from pyvhost.check.session import Offer, Outcome, Session

__all__ = [
    "CHECKS",
    "Check",
    "CheckResult",
    "Need",
    "Offer",
    "Outcome",
    "Report",
    "Session",
    "alive",
    "run_checks",
]
