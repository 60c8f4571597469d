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
            # MSG_DONTWAIT: a receiver that stopped reading fills its queue (10 datagrams on
            # Linux), and a blocking send would then freeze the supervisor's loop.
            sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, address)
    except OSError:  # systemd gone, the socket closed or full: a notification must never stop the proxy
        return False
    return True
