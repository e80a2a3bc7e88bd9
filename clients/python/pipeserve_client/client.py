"""The synchronous client: one method per task, named and parameterised as
transformers.pipeline names them, returning the contract's response messages (typed by the
generated .pyi stubs; `to_dict` turns any of them into plain Python values). The task methods
come from _methods.py (through the generated _client_methods.py); this module adds the
connection's lifecycle and map()."""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

import grpc

from ._client_methods import ClientMethods, Models
from .errors import PipeserveError, UnavailableError

__all__ = ["Client", "Models"]

T = TypeVar("T")
R = TypeVar("R")


class Client(ClientMethods):
    """A connection to one pipeserve server.

        with Client("127.0.0.1:50051") as client:
            labels = client.classify_image("cat.jpg", top_k=3).labels

    target: "host:port"; default $PIPESERVE_SERVER or 127.0.0.1:50051.
    timeout: default deadline in seconds for each call (None = no deadline); every method
        also takes its own `timeout=`.
    tls / root_certificates / client_certificate / client_key / server_name: TLS, and mutual
        TLS with a client certificate; certificates as PEM bytes or file paths. Giving any
        certificate turns TLS on; tls=True alone uses the system's root certificates.
    token: a bearer token sent as `authorization: Bearer <token>` on every call.
    retry: the RetryPolicy; RetryPolicy(max_attempts=1) disables retries.
    max_concurrency: how many calls a method given a list of inputs keeps in flight (8):
        client.classify_text(["a", "b"]) makes one call per text and returns the list of
        responses in order; the first input to fail raises (its `index` set) and cancels
        the other calls. `timeout` applies to each input's call.
    """

    _models = Models
    models: Models  # client.models.list() / get() / load() / unload()

    def _open_channel(self, options: tuple[tuple[str, Any], ...]) -> grpc.Channel:
        return self.connection.sync_channel(options)

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel connects; raises UnavailableError after `timeout` s."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise UnavailableError(f"cannot reach the pipeserve server at {self.target} within {timeout:g}s",
                                   code=grpc.StatusCode.UNAVAILABLE) from None

    # --- many inputs ----------------------------------------------------------------------

    def map(self, fn: Callable[[T], R], inputs: Iterable[T], *, concurrency: int = 8,
            return_exceptions: bool = False) -> Iterator[R | PipeserveError]:
        """Runs fn(item) for each input with at most `concurrency` calls in flight and yields
        the results in input order, as transformers' pipeline does over a dataset. The
        iterable is consumed lazily, so it may be a generator over a large dataset.

            for result in client.map(lambda p: client.classify_image(p, top_k=1), paths):
                ...

        A failed item raises its PipeserveError (after retries) when its turn comes, and the
        calls still in flight are cancelled; with return_exceptions=True the error is yielded
        in its place and iteration goes on."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        pending: deque[Future] = deque()
        items = iter(inputs)
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="pipeserve-map") as pool:
            try:
                for item in items:
                    pending.append(pool.submit(fn, item))
                    if len(pending) >= concurrency:
                        yield _result(pending.popleft(), return_exceptions)
                while pending:
                    yield _result(pending.popleft(), return_exceptions)
            finally:
                for future in pending:
                    future.cancel()


def _result(future: Future, return_exceptions: bool) -> Any:
    try:
        return future.result()
    except PipeserveError as error:
        if return_exceptions:
            return error
        raise
