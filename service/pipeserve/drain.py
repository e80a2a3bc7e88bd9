"""The server's draining state, and the quiet moment a draining server waits for before it
stops its transport.

gRPC core, when the server shuts down, cancels the calls that reached the transport but that
the asyncio server has not yet picked up: their clients see CANCELLED, which they do not
retry, instead of the UNAVAILABLE a draining server promises. A call in flight at SIGTERM is
exactly such a call (measured: a client calling every 50 ms got CANCELLED in a quarter of the
shutdowns). So draining first answers every new call UNAVAILABLE, and stops the transport only
once no call has arrived for a short while (or a bounded wait has passed)."""
from __future__ import annotations

import asyncio
import time

# No call for this long: the transport holds no call the server has not seen.
QUIET_S = 0.1
# A server under steady traffic never goes quiet; it waits at most this long (within the grace).
MAX_WAIT_S = 1.0


class Drain:
    def __init__(self) -> None:
        self.active = False
        self._last_arrival = time.monotonic()

    def note_arrival(self) -> None:
        self._last_arrival = time.monotonic()

    async def wait_for_quiet(self, limit_s: float, quiet_s: float = QUIET_S) -> float:
        """Waits until no call arrived for `quiet_s` counted from now at the earliest (a call
        the transport holds may not have been seen yet), at most `limit_s`; returns the time
        waited."""
        start = time.monotonic()
        deadline = start + max(0.0, limit_s)
        while (now := time.monotonic()) < deadline:
            quiet_at = max(start, self._last_arrival) + quiet_s
            if now >= quiet_at:
                break
            await asyncio.sleep(min(quiet_at, deadline) - now)
        return time.monotonic() - start
