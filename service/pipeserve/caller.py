"""Who is making the current call, as the security interceptor established it.

The interceptor records the caller in a context variable for the duration of each call (every
gRPC call runs in its own asyncio task, whose context is a copy), so code far below the
servicers — the model manager deciding whether a task call may load a model on demand — can
ask without every servicer passing it along. Code that runs outside any call (preloads,
in-process tests) sees UNKNOWN, which may not load anything on demand: the safe answer.
"""
from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    # Who, for limits and logs: "token:<hash prefix>" or "peer:<host>"; never the token itself.
    identity: str
    # Presented an admin token (only meaningful when auth is on).
    is_admin: bool
    # The server checks bearer tokens; when False, anyone who reaches the port is equal.
    auth_enabled: bool

    @property
    def may_change_models(self) -> bool:
        """Whether this caller may decide what is loaded (LoadModel's rule)."""
        return self.is_admin or not self.auth_enabled


UNKNOWN = Caller(identity="unknown", is_admin=False, auth_enabled=True)

_current: ContextVar[Caller] = ContextVar("pipeserve_caller", default=UNKNOWN)


def current() -> Caller:
    return _current.get()


def set_current(caller: Caller) -> Token:
    return _current.set(caller)
