"""Kernel-vhost tests: the `kernel` marker, and where those tests run.

Tests marked `kernel` run Python scripts against /dev/vhost-net, -vsock and -scsi through the
`kernel_runner` fixture (tests/peers/kernel_runner.py), which runs each script where it can:
directly on this host when it has the devices the script needs and we are root (in a private
network namespace), else inside the test guest (tests/peers/pyguest.py), whose kernel has them.
$PYVHOST_KERNEL_TESTS=direct or =guest forces one place (a forced place that is not available
fails the tests, saying why); unset or `auto`, a test that can run in neither place is skipped
with the reason for both (scripts/fetch-pyguest builds the guest's image). The `pyguest` fixture
is for the tests of the guest harness itself, which run only in the guest. The other tests here
run on the host and need neither.
"""

from __future__ import annotations

import functools
from typing import NoReturn

import pytest

from peers.kernel_runner import (
    MODE_ENV,
    KernelRunner,
    KernelTestsUnavailableError,
    locate_guest,
    requested_mode,
)
from peers.pyguest import PyGuestAssets

KERNEL_MARKER = (
    "kernel: runs Python with kernel vhost, directly on a host with /dev/vhost-* or in the test "
    "guest (scripts/fetch-pyguest); $PYVHOST_KERNEL_TESTS=auto|direct|guest"
)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker here too, so `-m kernel` works before pyproject lists it; refuse an
    unknown $PYVHOST_KERNEL_TESTS at once."""
    config.addinivalue_line("markers", KERNEL_MARKER)
    try:
        requested_mode()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from e


_guest = functools.cache(locate_guest)
"""The guest's kernel, initramfs and image, or why they are unavailable (looked up once)."""


def _unavailable(error: KernelTestsUnavailableError) -> NoReturn:
    """A forced place that is not available is a failure; otherwise the test is skipped."""
    if error.forced:
        pytest.fail(str(error), pytrace=False)
    pytest.skip(str(error))


@pytest.fixture(scope="session")
def kernel_runner() -> KernelRunner:
    """Runs kernel-vhost scripts directly or in the guest ($PYVHOST_KERNEL_TESTS); each call
    skips, or fails when a place was forced, if the script can run nowhere."""
    return KernelRunner(mode=requested_mode(), guest=_guest, unavailable=_unavailable)


@pytest.fixture(scope="session")
def pyguest() -> PyGuestAssets:
    """Kernel, initramfs and root image for `run_in_guest(..., assets=pyguest)`, for the tests
    of the guest harness: skipped when they are not cached (failed when the guest was forced) or
    when $PYVHOST_KERNEL_TESTS=direct."""
    mode = requested_mode()
    if mode == "direct":
        pytest.skip(f"${MODE_ENV}=direct: the guest harness's own tests are not run")
    found = _guest()
    if isinstance(found, str):
        _unavailable(
            KernelTestsUnavailableError(
                f"Python guest unavailable: {found}", forced=mode == "guest"
            )
        )
    return found
