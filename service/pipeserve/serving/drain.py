"""The server's draining state: which calls it is handling, and turning new ones away.

Why a count and not a quiet moment: gRPC core, when the server shuts down
(grpc_server_shutdown_and_notify), answers CANCELLED — which clients do not retry — to every
call the transport accepted that the application had not yet picked up, and to every call that
reaches it after the shutdown began but before its client has read the GOAWAY
(grpc/grpc#41785: such calls are "zombified"). A client that keeps calling through the drain
can therefore always be caught, however long the server first waits for a lull; a busy machine
only widens the window. So:

1. on SIGTERM the server drains: health says NOT_SERVING (Check and Watch) and every new call
   is answered UNAVAILABLE/DRAINING at once, while the transport stays open;
2. calls admitted before that run to the end; the drain waits until none is left (within the
   grace period), and keeps answering UNAVAILABLE for at least `UNAVAILABLE_WINDOW_S`, so
   health checkers and load balancers see NOT_SERVING and move their traffic;
3. the process then exits without a core shutdown (server.py): the kernel closes its sockets,
   and every client whose call is still on its way sees UNAVAILABLE (connection closed), which
   it retries on another replica. Nothing is left in flight to be cut short.

An embedding process that stops a server in-process (RunningServer.drain_and_stop) has no such
exit: it drains the same way, then stops the transport with grpc's shutdown, which is exact
only when its clients stopped calling first (tests do)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Iterator

from ..errors import Draining

# Once draining, new calls get UNAVAILABLE for at least this long (within the grace period):
# a health checker polling every few hundred milliseconds sees NOT_SERVING before the port closes.
UNAVAILABLE_WINDOW_S = 1.0


class Drain:
    def __init__(self) -> None:
        self.active = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one call for as long as it runs; a draining server refuses it instead."""
        if self.active:
            raise Draining("the server is shutting down; retry on another replica")
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, grace_s: float, window_s: float = UNAVAILABLE_WINDOW_S) -> float:
        """Turns new calls away, waits for the admitted ones to finish (at most `grace_s`) and
        for the UNAVAILABLE window (within the grace); returns the grace left."""
        start = time.monotonic()
        self.active = True
        grace_s = max(0.0, grace_s)
        if self.in_flight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        elapsed = time.monotonic() - start
        hold = min(grace_s, window_s) - elapsed
        if hold > 0:
            await asyncio.sleep(hold)
        return max(0.0, grace_s - (time.monotonic() - start))
