"""Kernel-vhost tests: the `kernel` marker, and the Python guest those tests run in.

Tests marked `kernel` run Python inside the test guest (tests/peers/pyguest.py), whose kernel has
/dev/vhost-net, -vsock and -scsi. They skip, naming the command to run, when the cached root image
or guest kernel is missing. The other tests here run on the host and need neither.
"""

from __future__ import annotations

import functools

import pytest

from peers.pyguest import PyGuestAssets, PyGuestUnavailableError, locate

KERNEL_MARKER = "kernel: runs Python with kernel vhost in the test guest (scripts/fetch-pyguest)"


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker here too, so `-m kernel` works before pyproject lists it."""
    config.addinivalue_line("markers", KERNEL_MARKER)


@functools.cache
def _assets() -> PyGuestAssets | str:
    """The guest's kernel, initramfs and image, or why they are unavailable (looked up once)."""
    try:
        return locate()
    except PyGuestUnavailableError as e:
        return str(e)


def _require() -> PyGuestAssets:
    found = _assets()
    if isinstance(found, str):
        pytest.skip(f"Python guest unavailable: {found}")
    return found


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip `kernel`-marked tests cleanly on machines without the guest."""
    if item.get_closest_marker("kernel") is not None:
        _require()


@pytest.fixture(scope="session")
def pyguest() -> PyGuestAssets:
    """Kernel, initramfs and root image for `run_in_guest(..., assets=pyguest)`; skips when
    they are not cached (scripts/fetch-pyguest builds them)."""
    return _require()
