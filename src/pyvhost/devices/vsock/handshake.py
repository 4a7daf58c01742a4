"""The host side's ``CONNECT <port>\\n`` line, as Firecracker's hybrid vsock defines it (sans-I/O).

A host program that connects to the device's Unix socket names the guest port it wants in one
line; the device answers ``OK <host port>\\n`` once the guest accepted, or closes the connection.
Bytes the program wrote after its line are kept for the guest.
"""

from __future__ import annotations

from pyvhost.virtio.vsock.wire import VMADDR_PORT_ANY

__all__ = ["MAX_LINE", "ConnectLine", "HandshakeError", "ok_line", "parse_connect"]

MAX_LINE = 64
"""Longest CONNECT line accepted, newline included (``CONNECT 4294967294`` is 18 bytes)."""


class HandshakeError(ValueError):
    """The host program's first line is not ``CONNECT <port>``: the device closes it."""


def parse_connect(line: bytes) -> int:
    """The guest port of one ``CONNECT <port>`` line (no newline; the word in any case, as
    Firecracker accepts it)."""
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        raise HandshakeError(f"{line[:MAX_LINE]!r} is not ASCII") from None
    if len(words) != 2 or words[0].upper() != "CONNECT":
        raise HandshakeError(f"{line[:MAX_LINE]!r} is not 'CONNECT <port>'")
    port = words[1]
    if not port.isdigit() or int(port) >= VMADDR_PORT_ANY:
        raise HandshakeError(f"{port!r} is not a port (0..{VMADDR_PORT_ANY - 1})")
    return int(port)


def ok_line(host_port: int) -> bytes:
    """The answer once the guest accepted: the host-side port of the new connection."""
    return b"OK %d\n" % host_port


class ConnectLine:
    """Collects a host program's first bytes until its CONNECT line is complete."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[int, bytes] | None:
        """Take what the program sent: ``(guest port, bytes after the line)`` once the line is
        whole, None while it is not; HandshakeError for a bad or overlong line."""
        self._buf += data
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) >= MAX_LINE:
                raise HandshakeError(f"no newline in the first {MAX_LINE} bytes")
            return None
        if end >= MAX_LINE:
            raise HandshakeError(f"a line of {end + 1} bytes, more than {MAX_LINE}")
        port = parse_connect(bytes(self._buf[:end]).rstrip(b"\r"))
        return port, bytes(self._buf[end + 1 :])
