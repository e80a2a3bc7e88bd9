"""The server's starting state: until the models it preloads at start have loaded (or failed
to), task services answer UNAVAILABLE/STARTING, which clients retry, instead of the
NOT_FOUND/NO_DEFAULT_MODEL an empty model name would get, and health reports them (and the
server, "") NOT_SERVING. ModelService, health and reflection stay open: an operator can watch
the models load."""
from __future__ import annotations

from typing import Iterable

from ..errors import Starting


class Startup:
    def __init__(self, task_services: Iterable[str], starting: bool) -> None:
        """`task_services`: full names of the services that serve a task."""
        self.task_services = frozenset(task_services)
        self.starting = starting

    def check(self, method: str) -> None:
        """Refuses a call to a task service while the server is starting."""
        if self.starting and method.lstrip("/").partition("/")[0] in self.task_services:
            raise Starting("the server is starting and still loading its default models; retry shortly")

    def finish(self) -> None:
        self.starting = False
