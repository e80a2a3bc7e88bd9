"""The gRPC server: every service of the contracts, health per service, reflection, one error
interceptor, preloaded default models, and a draining shutdown on SIGTERM.

Start order (issue #16, cold start): this module imports only grpc and the serving layer, so
the port is bound and health answers (NOT_SERVING) within a few hundred milliseconds of exec;
torch, the model manager and the servicers are imported next in a worker thread while the
event loop answers, and their services reply UNAVAILABLE/STARTING until they are bound
(serving/late_services.py). The default models start loading as soon as the manager exists,
alongside the import of the servicers. `startup_timeline` logs when each stage ended."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

# Before anything imports torch: OpenMP reads its settings once, when it loads.
from .serving.openmp_defaults import apply_openmp_defaults  # imports nothing heavy

apply_openmp_defaults()

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import ConfigError, ModelSpec, Settings, load_settings
from .errors import Starting, TaskNotImplemented
from .serving.drain import Drain
from .serving.interceptors import ErrorInterceptor
from .serving.late_services import LateServices, refusing_handlers
from .serving.logs import configure_logging
from .serving.observability import TelemetryInterceptor
from .serving.security import SecurityInterceptor, server_credentials
from .serving.startup import Startup, prefetch_weights, startup_timeline
from .serving.tracing import make_tracer
from .tasks import Task

if TYPE_CHECKING:  # torch-backed: imported by _import_runtime, after the port is bound
    from .api.common import App
    from .serving.metrics import Metrics  # prometheus_client: only when metrics_listen is set
    from .http.front_door import FrontDoor
    from .runtime.manager import ModelManager

log = logging.getLogger("pipeserve.server")

# Full service name -> (servicer module, task it serves). A module that does not exist yet
# leaves its service answering UNIMPLEMENTED with a clear message.
SERVICES: dict[str, tuple[str, Task | None]] = {
    "pipeserve.v1.ModelService": ("pipeserve.api.model", None),
    "pipeserve.v1.SpeechRecognitionService": ("pipeserve.api.speech_recognition", Task.AUTOMATIC_SPEECH_RECOGNITION),
    "pipeserve.v1.TextGenerationService": ("pipeserve.api.text_generation", Task.TEXT_GENERATION),
    "pipeserve.v1.ImageClassificationService": ("pipeserve.api.image_classification", Task.IMAGE_CLASSIFICATION),
    "pipeserve.v1.ZeroShotClassificationService": ("pipeserve.api.zero_shot_classification", Task.ZERO_SHOT_CLASSIFICATION),
    "pipeserve.v1.DocumentQuestionAnsweringService": ("pipeserve.api.document_question_answering", Task.DOCUMENT_QUESTION_ANSWERING),
    "pipeserve.v1.TextClassificationService": ("pipeserve.api.text_classification", Task.TEXT_CLASSIFICATION),
    "pipeserve.v1.TokenClassificationService": ("pipeserve.api.token_classification", Task.TOKEN_CLASSIFICATION),
    "pipeserve.v1.QuestionAnsweringService": ("pipeserve.api.question_answering", Task.QUESTION_ANSWERING),
    "pipeserve.v1.FillMaskService": ("pipeserve.api.fill_mask", Task.FILL_MASK),
    "pipeserve.v1.FeatureExtractionService": ("pipeserve.api.feature_extraction", Task.FEATURE_EXTRACTION),
}


def _starting_error(method_name: str) -> Starting:
    return Starting("the server is starting (its services are still being loaded); retry shortly")


def _unimplemented_error(service_name: str):
    return lambda method_name: TaskNotImplemented(
        f"{service_name}.{method_name} is not implemented in this server yet")


def _import_generated() -> None:
    """Registers every contract in the descriptor pool (reflection and the placeholders of
    services not bound yet need them). pipeserve.v1 lives in the client distribution's folder
    (pipeserve/__init__.py), so its own search path is listed, not this file's neighbour."""
    import pkgutil

    from . import v1

    for module in sorted(m.name for m in pkgutil.iter_modules(v1.__path__) if m.name.endswith("_pb2")):
        importlib.import_module(f"pipeserve.v1.{module}")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    app: "App"
    port: int
    health: health.aio.HealthServicer if hasattr(health, "aio") else object
    drain: Drain = field(default_factory=Drain)
    # Prometheus metrics (None when `metrics_listen` is empty); `metrics.port` is the HTTP port.
    metrics: Metrics | None = None
    security: SecurityInterceptor | None = None
    # The OpenAI-compatible HTTP/JSON front door (None when `http_listen` is empty); `http.port`.
    http: "FrontDoor | None" = None
    startup: Startup = field(default_factory=lambda: Startup((), starting=False))
    # The background load of the default models, when the server preloads them.
    preloading: asyncio.Task | None = None

    async def drain_calls(self, grace_s: float | None = None) -> float:
        """Health goes NOT_SERVING and new calls get UNAVAILABLE while the calls in flight
        finish (at most `grace_s`, the settings' grace period by default); returns the grace
        left. The transport stays open throughout (see serving/drain.py)."""
        grace_s = self.app.settings.grace_period_s if grace_s is None else grace_s
        self.drain.active = True
        if self.preloading is not None:
            self.preloading.cancel()
        await self.health.enter_graceful_shutdown()
        left = await self.drain.drain(grace_s)
        if self.drain.in_flight:
            log.warning("%d calls were still running when the grace period ended", self.drain.in_flight)
        return left

    async def release(self) -> None:
        """Closes the HTTP front door, frees the models and closes the metrics endpoint."""
        if self.http is not None:
            await self.http.close()
        await self.app.manager.close()
        if self.metrics is not None:
            self.metrics.close()

    async def drain_and_stop(self, grace_s: float | None = None) -> None:
        """In-process stop: drains, then stops the transport with what is left of the grace.
        grpc's shutdown cancels calls that reach it at that moment, so the caller stops its
        clients first; the server process exits instead (serve())."""
        left = await self.drain_calls(grace_s)
        await self.server.stop(left)
        await self.release()


class _Health:
    """grpc.health.v1 statuses: "" tracks the process (NOT_SERVING while it starts); a task
    service is SERVING once the servicers are bound and its own default (if it preloads one)
    has finished loading, and while a model for its task is ready."""

    def __init__(self, servicer, startup: Startup) -> None:
        self.servicer = servicer
        self.startup = startup
        # One refresh at a time: a set() waits while Watch streams read, and an older refresh
        # must not finish after a newer one with the statuses it read before.
        self._lock = asyncio.Lock()

    async def refresh(self, manager: "ModelManager | None") -> None:
        async with self._lock:
            bound = self.startup.bound and manager is not None
            open_ = bound and self.startup.open
            serving = manager.serving_tasks() if bound else set()
            await self.servicer.set("", health_pb2.HealthCheckResponse.SERVING if open_
                                    else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name, (_, task) in SERVICES.items():
                ok = bound if task is None else task in serving and self.startup.task_open(task.value)
                await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING if ok
                                        else health_pb2.HealthCheckResponse.NOT_SERVING)


@contextlib.contextmanager
def _collector_paused(freeze: bool = False):
    """Python's cyclic garbage collector off while the runtime imports: torch and the servicers
    create ~280k objects that all live on, and the collections they trigger only traverse
    them: 1.43-1.53 -> 1.13-1.19 CPU seconds for the imports (issue #16). Restored after.

    Pausing alone only defers those traversals: the objects wait in the youngest generation,
    and the first collections after it (generation 0, 1, then a full one, 0.09-0.11 CPU s each
    on tiny.en's server) fall on the load and the first call. `freeze` moves everything alive
    into the permanent generation instead (gc.freeze), which no collection traverses: what
    the imports created lives as long as the process anyway. So does whatever calls answered
    meanwhile (health, STARTING refusals) leave in reference cycles: once per process, at most
    what the calls of that second of start leave. Only a server process freezes (serve()): in
    a process that also holds other objects (tests), a cycle frozen alive would never be
    collected once it became garbage."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


def _import_runtime() -> dict[str, Any]:
    """The torch-backed half of the server (runs in a worker thread while the port answers)."""
    from .api.common import App
    from .runtime.batching import DynamicBatcher
    from .runtime.manager import ModelManager
    from .scheduling import compute

    return dict(App=App, DynamicBatcher=DynamicBatcher, ModelManager=ModelManager, compute=compute)


def _import_servicers() -> dict[str, Any]:
    """Servicer modules by service name; None where a service has no implementation yet."""
    modules: dict[str, Any] = {}
    for service_name, (module_name, _task) in SERVICES.items():
        try:
            modules[service_name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            modules[service_name] = None
    return modules


async def start(settings: Settings, *, preload_defaults: bool = False, freeze_imports: bool = False) -> RunningServer:
    """Starts serving: binds and answers health first, then imports the runtime and the
    servicers (their calls answer UNAVAILABLE/STARTING meanwhile); returns once every service
    is bound. With `preload_defaults` the models of `preload_specs` load in the background
    (`RunningServer.preloading`), and each task's service answers UNAVAILABLE/STARTING until
    its own default's load ends, however it ends. `freeze_imports`: what the runtime's import
    created is exempted from garbage collection (see _collector_paused; server processes)."""
    _import_generated()
    specs = preload_specs(settings) if preload_defaults else []
    prefetch_weights(spec.model for spec in specs)  # the disk reads the weights while torch imports
    holder: dict[str, Any] = {}
    health_servicer = health.aio.HealthServicer()
    drain = Drain()
    startup = Startup({name: task.value for name, (_, task) in SERVICES.items() if task is not None},
                      starting=bool(specs), bound=False, loading=(Task.parse(spec.task).value for spec in specs))
    health_state = _Health(health_servicer, startup)
    loop = asyncio.get_running_loop()

    def on_change() -> None:
        running = holder.get("server")
        if running is not None and not drain.active:
            loop.create_task(health_state.refresh(running.app.manager))

    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    metrics: Metrics | None = None
    if settings.metrics_listen:
        from .serving.metrics import Metrics

        metrics = Metrics()
        metrics.awaiting_app = True  # calls before the app is bound label their model "unknown"
    security = SecurityInterceptor(settings)

    def default_model(task: str) -> str | None:
        manager = holder.get("manager")
        return manager.default_name(Task(task)) if task and manager is not None else None

    telemetry = TelemetryInterceptor(
        metrics=metrics, tracer=make_tracer(settings.tracing),
        tasks={name: task.value if task else "" for name, (_, task) in SERVICES.items()},
        default_model=default_model)
    # Outermost first: telemetry sees the final status; errors raised by security checks
    # become statuses with ErrorInfo in the error interceptor around them.
    server = grpc.aio.server(
        interceptors=[telemetry,
                      ErrorInterceptor(drain, startup),
                      security],
        options=options)
    services = LateServices(SERVICES, _starting_error)
    server.add_generic_rpc_handlers((services,))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    credentials = server_credentials(settings)
    port = (server.add_secure_port(settings.listen, credentials) if credentials is not None
            else server.add_insecure_port(settings.listen))
    if port == 0:
        raise SystemExit(f"cannot listen on {settings.listen}")
    loopback = None
    if settings.http_listen:  # the HTTP front door calls this server through a private socket
        from .http import front_door  # aiohttp is imported only by servers that serve HTTP

        loopback, loopback_folder = front_door.loopback_address()
        if server.add_insecure_port(loopback) == 0:
            raise SystemExit(f"cannot listen on {loopback} (the HTTP front door's loopback)")
    await server.start()
    preloading: asyncio.Task | None = None
    try:
        await health_state.refresh(None)
        log.info("pipeserve listening on %s (port %d); loading the runtime", settings.listen, port)
        startup_timeline("listening")

        # Frozen before any model exists: the preload starts below, and the servicers' import
        # (paused, not frozen) runs beside it.
        with _collector_paused(freeze=freeze_imports):
            runtime = await asyncio.to_thread(_import_runtime)
        if settings.compute_lane and settings.device == "cpu":
            runtime["compute"].install(lanes=settings.compute_lanes)
        manager = runtime["ModelManager"](settings, on_change=on_change)
        holder["manager"] = manager
        batcher = runtime["DynamicBatcher"](manager, max_batch_size=settings.max_batch_size,
                                            max_wait_ms=settings.max_batch_wait_ms, max_queue=settings.max_queue)
        app = runtime["App"](settings=settings, manager=manager, batcher=batcher)
        running = RunningServer(server=server, app=app, port=port, health=health_servicer, drain=drain,
                                metrics=metrics, security=security, startup=startup)
        holder["server"] = running
        startup_timeline("runtime imported")
        if specs:
            async def preload_then_open() -> None:
                def loaded(spec: ModelSpec) -> None:
                    startup.loaded(Task.parse(spec.task).value)
                    if not drain.active:
                        loop.create_task(health_state.refresh(manager))

                try:
                    await preload(running, specs, on_loaded=loaded)
                finally:  # loaded, failed or cancelled: the server is no longer starting
                    startup.finish()
                    startup_timeline("default models done")
                    if not drain.active and startup.bound:
                        await health_state.refresh(manager)

            # The defaults load while the servicers import: the load's torch work releases the GIL.
            running.preloading = preloading = loop.create_task(preload_then_open())

        with _collector_paused():
            servicers = await asyncio.to_thread(_import_servicers)
        for service_name, module in servicers.items():
            if module is None:
                log.warning("%s has no implementation yet: it answers UNIMPLEMENTED", service_name)
                services.bind(refusing_handlers(service_name, _unimplemented_error(service_name)))
            else:
                module.register(services, app)
        if metrics is not None:
            metrics.bind(app)
            metrics.serve(settings.metrics_listen)
        if loopback is not None:
            running.http = await front_door.start(settings, loopback, loopback_folder)
        startup.bound = True
        await health_state.refresh(manager)
        startup_timeline("services bound")
        return running
    except BaseException:  # a runtime that fails to import or bind leaves no server behind
        if preloading is not None:
            preloading.cancel()
        await server.stop(0)
        raise


def preload_specs(settings: Settings) -> list[ModelSpec]:
    """Models to load at start: the configured ones, then the embedded defaults for the
    tasks the configuration leaves open. Each names its task (the table's key where the spec
    leaves it out): its service opens when that load ends."""
    specs = {task: spec if spec.task else dataclasses.replace(spec, task=task) for task, spec in settings.preload.items()}
    if settings.embedded_defaults:
        try:
            from .checkpoints.embedded import embedded_models
        except ModuleNotFoundError:
            embedded_models = dict
        for task, name in embedded_models().items():
            specs.setdefault(task, ModelSpec(model=name, task=task))
    return list(specs.values())


async def preload(running: RunningServer, specs: list[ModelSpec] | None = None,
                  on_loaded: Callable[[ModelSpec], None] = lambda spec: None) -> None:
    """Loads the defaults concurrently (one at a time under a memory budget): each load's torch
    work runs on its own executor thread with one OpenMP thread (scheduling/compute.py), so two
    models load on two cores.
    `on_loaded(spec)` as each ends, loaded or failed (its task's service opens then)."""
    manager = running.app.manager

    async def one(spec: ModelSpec) -> None:
        try:
            await manager.load(spec.model, revision=spec.revision, task=spec.task,
                               options=manager.load_options(spec), set_default=True)
        except Exception as exc:  # a default that fails to load is reported; the rest still serve
            log.error("preloading %s for %s failed: %s", spec.model, spec.task, exc)
        finally:
            on_loaded(spec)

    specs = preload_specs(running.app.settings) if specs is None else specs
    if running.app.settings.memory_budget_bytes > 0:
        # Under a memory budget, one at a time: the budget counts resident models, and loads
        # side by side would hold their transient copies at once.
        for spec in specs:
            await one(spec)
    else:
        await asyncio.gather(*(one(spec) for spec in specs))


async def serve(settings: Settings) -> None:
    running = await start(settings, preload_defaults=True, freeze_imports=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: in-flight calls have %.0fs to finish", settings.grace_period_s)
    await running.drain_calls()
    await running.release()
    log.info("stopped")
    _exit_closing_the_transport()


def _exit_closing_the_transport() -> None:
    """Ends the process without grpc's server shutdown: the kernel closes the listening socket
    and every connection, so a call still on its way gets UNAVAILABLE (connection closed),
    which clients retry, where grpc's shutdown would answer CANCELLED (serving/drain.py). Exit
    handlers (log handlers, an OpenTelemetry SDK's span export) run first; grpc's own are
    not needed by a process that is about to end."""
    import atexit
    import os

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load_settings(argv)  # --help and --version print and exit here
    except ConfigError as error:
        # argparse's convention: one line on stderr, exit status 2, no traceback.
        print(f"pipeserve-server: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_format, settings.log_level.upper(), sys.stderr)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
