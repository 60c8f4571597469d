"""systemd's readiness protocol (sd_notify) with the stdlib: one datagram to $NOTIFY_SOCKET.

Without NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def sd_notify(*fields: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError:  # systemd gone or the socket closed: a notification must never stop the proxy
        return False
    return True
