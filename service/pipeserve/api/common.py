"""What every servicer shares: the application handle, request ids, run details, input
fetching, and running blocking pipeline work (whole or streamed) off the event loop."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from google.protobuf.message import Message

from ..bounds import request_id_problem
from ..config import Settings
from ..errors import InvalidInput
from ..inputs import uri as uri_inputs
from ..pipelines.options import TaskOptions
from ..runtime.batching import BatchResult, DynamicBatcher
from ..runtime.manager import ModelEntry, ModelManager
from ..scheduling import compute
from ..scheduling.admission import Admission
from ..v1 import common_pb2


@dataclass
class App:
    """Handles a servicer needs; built once by the server."""

    settings: Settings
    manager: ModelManager
    batcher: "DynamicBatcher"
    extras: dict[str, Any] = field(default_factory=dict)
    # Calls that neither the batcher nor the generation engine bounds (speech recognition)
    # are admitted here: per model, asr_max_batch_rows running (their windows batch
    # together) and max_queue waiting.
    admission: Admission | None = None

    def __post_init__(self) -> None:
        if self.admission is None:
            self.admission = Admission(running=self.settings.asr_max_batch_rows, max_waiting=self.settings.max_queue)

    def admitted(self, entry: ModelEntry):
        """`async with app.admitted(entry) as waited_s:` holds one of the model's slots, or
        raises QueueFull at once when its queue is full."""
        return self.admission.slot(entry.name, id(entry.pipeline))

    async def batched(self, entry: ModelEntry, item: Any, options: TaskOptions) -> "BatchResult":
        """Runs `entry.pipeline.run_batch([item, ...others], options)` batched with concurrent
        callers whose options are equal; `options` comes from `entry.pipeline.options(...)`."""
        return await self.batcher.submit(entry, item, options)


def request_id(request: Message) -> str:
    """The client's request id, or a fresh one, echoed in every response. An id that is too
    long or holds control characters is refused (it would be echoed into logs and traces)."""
    rid = getattr(request, "request_id", "")
    if not rid:
        return uuid.uuid4().hex
    problem = request_id_problem(rid)
    if problem:
        raise InvalidInput(f"{problem}: send a short printable id, or none", reason="INVALID_REQUEST_ID")
    return rid


def optional_fields(message: Message, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Proto3 `optional` fields -> {name: value or None when unset}."""
    return {name: getattr(message, name) if message.HasField(name) else None for name in names}


def run_info(entry: ModelEntry, *, queue_ms: float = 0.0, compute_ms: float = 0.0,
             batch_size: int = 1, batch: "BatchResult | None" = None) -> common_pb2.RunInfo:
    """Run details for a response; pass `batch` for calls that went through the batcher."""
    if batch is not None:
        queue_ms, compute_ms, batch_size = batch.queue_ms, batch.compute_ms, batch.batch_size
    described = entry.pipeline.describe() if entry.pipeline else {}
    return common_pb2.RunInfo(model=entry.name, device=described.get("device", ""),
                              dtype=described.get("dtype", ""), queue_ms=queue_ms,
                              compute_ms=compute_ms, batch_size=batch_size)


class Timer:
    """Milliseconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000.0


async def input_bytes(app: App, *, data: bytes, uri: str, which: str, max_bytes: int) -> bytes:
    """Bytes of an ImageInput/AudioInput-style oneof: inline data, or a URI the allowlist permits.
    A URI is fetched on its own bounded pool; when the call's deadline passes (grpc.aio cancels
    the handler), the fetch is aborted and its worker freed."""
    if uri:
        return await uri_inputs.fetch_async(uri, app.settings, max_bytes)
    if not data:
        raise InvalidInput(f"{which} is empty: send its bytes or a URI")
    return data


async def iterate_in_thread(make_iterator: Callable[[], Iterator[Any]], executor,
                            max_buffered: int = 64, on_lane: bool = True) -> AsyncIterator[Any]:
    """Runs a blocking generator on a worker thread and yields its items on the event loop.
    With `on_lane` each step is a compute-lane task; without, the generator runs on the worker
    itself (one whose model work is scheduled elsewhere and waits for it off the lane).

    When the consumer stops early (client cancelled, deadline passed), the producer sees the
    stop flag before its next item, closes the generator (its `finally` frees memory), and
    the worker is released."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue(maxsize=max_buffered)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(items.put(item), loop)
        while not stop.is_set():
            try:
                future.result(timeout=0.1)
                return
            except TimeoutError:
                continue
        future.cancel()

    def produce() -> None:
        # Each step of the generator is one compute-lane task, so concurrent calls interleave.
        iterator = None
        run = compute.call if on_lane else (lambda fn, *args: fn(*args))
        try:
            iterator = run(make_iterator)
            while not stop.is_set():
                item = run(next, iterator, done)
                if item is done:
                    break
                put(("item", item))
        except BaseException as exc:  # delivered to the consumer, which re-raises it
            put(("error", exc))
        finally:
            close = getattr(iterator, "close", None)
            if close:
                run(close)
            put(("end", done))

    worker = loop.run_in_executor(executor, produce)
    try:
        while True:
            kind, item = await items.get()
            if kind == "end":
                break
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        # Drain so a producer blocked on a full queue can notice `stop` and finish.
        while not items.empty():
            items.get_nowait()


def enum_option(message: Message, field_name: str, prefix: str) -> str | None:
    """An optional enum field -> its lower-case value name without `prefix`
    (FUNCTION_TO_APPLY_SIGMOID -> "sigmoid"); None when unset or UNSPECIFIED."""
    if not message.HasField(field_name):
        return None
    descriptor = message.DESCRIPTOR.fields_by_name[field_name].enum_type
    name = descriptor.values_by_number[getattr(message, field_name)].name
    if name.endswith("_UNSPECIFIED"):
        return None
    return name.removeprefix(prefix).lower()
