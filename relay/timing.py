"""Clock helpers shared by the forwarding path."""

from __future__ import annotations

import time

_NTP_EPOCH_OFFSET = 2208988800


def ntp_now() -> int:
    """Current time as a 64-bit NTP timestamp."""
    now = time.time() + _NTP_EPOCH_OFFSET
    seconds = int(now)
    return (seconds << 32) | int((now - seconds) * (1 << 32))
