"""ModelService: list, inspect, load and unload models through the manager."""
from __future__ import annotations

import json

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from ..checkpoints.model_names import check_model_name
from ..checkpoints.weights import dtype_name
from ..errors import InvalidParameter
from ..runtime.manager import ModelEntry, ModelState
from ..tasks import Task
from ..v1 import model_pb2 as pb, model_pb2_grpc as pb_grpc
from .common import App

SERVICE_NAME = "pipeserve.v1.ModelService"
TASK = None

_STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
    ModelState.UNLOADING: pb.MODEL_STATE_UNLOADING,
}
_DTYPES = {"float32": pb.D_TYPE_FLOAT32, "float16": pb.D_TYPE_FLOAT16, "bfloat16": pb.D_TYPE_BFLOAT16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_QUANTIZATIONS = {"none": pb.QUANTIZATION_NONE, "int8": pb.QUANTIZATION_INT8, "grouped": pb.QUANTIZATION_GROUPED}
_QUANTIZATION_NAMES = {v: k for k, v in _QUANTIZATIONS.items()}


def task_to_proto(task: Task | None) -> int:
    return pb.Task.Value(task.proto_name) if task else pb.TASK_UNSPECIFIED


def task_from_proto(value: int) -> Task | None:
    if value == pb.TASK_UNSPECIFIED:
        return None
    return Task.parse(pb.Task.Name(value))


def _timestamp(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def model_info(entry: ModelEntry, is_default: bool) -> pb.ModelInfo:
    described = entry.pipeline.describe() if entry.pipeline else {}
    dtype = described.get("dtype") or entry.options.dtype
    return pb.ModelInfo(
        name=entry.name,
        revision=entry.revision or "",
        task=task_to_proto(entry.task),
        family=described.get("family", ""),
        architecture=described.get("architecture", ""),
        state=_STATES[entry.state],
        device=described.get("device") or entry.options.device,
        dtype=_DTYPES.get(dtype, pb.D_TYPE_UNSPECIFIED),
        bytes=entry.bytes,
        in_flight=entry.in_flight,
        error=entry.error,
        is_default=is_default,
        loaded_at=_timestamp(entry.loaded_at),
        last_used_at=_timestamp(entry.last_used_at),
        source_path=str(entry.files.gguf or entry.files.path) if entry.files else "",  # a GGUF: its file
        quantized_int8=bool(entry.options.load_in_8bit),  # None (not yet resolved): the default, float
        default_options=_options_struct(entry.options.defaults),
        memory=pb.ModelMemory(**{f"{kind}_bytes": n for kind, n in entry.memory.items()}),
        weights_dtype=_storage_dtype(entry.options.weights_dtype, dtype),
        # resolved when the load starts (loading.with_source_defaults); unset before that
        quantization=_QUANTIZATIONS.get(entry.options.quantization, pb.QUANTIZATION_UNSPECIFIED),
    )


def _storage_dtype(weights_dtype: str | None, dtype: str) -> int:
    """ModelInfo.weights_dtype: the storage dtype where it differs from the compute dtype (a
    preload spec may spell either another way: config.DTYPE_NAMES)."""
    storage = dtype_name(weights_dtype or "")
    return _DTYPES.get(storage, pb.D_TYPE_UNSPECIFIED) if storage != dtype_name(dtype) else pb.D_TYPE_UNSPECIFIED


def _dtype_field(request: pb.LoadModelRequest, field: str) -> str | None:
    """The dtype name a DType field of the request names; None when unset or UNSPECIFIED (an
    enum number outside DType never gets here: serving/ refuses it, INVALID_ENUM_VALUE)."""
    value = getattr(request, field)
    return _DTYPE_NAMES[value] if request.HasField(field) and value != pb.D_TYPE_UNSPECIFIED else None


def _quantization_field(request: pb.LoadModelRequest) -> str | None:
    """The form LoadModelRequest.quantization names; None when unset or UNSPECIFIED."""
    value = request.quantization
    if not request.HasField("quantization") or value == pb.QUANTIZATION_UNSPECIFIED:
        return None
    return _QUANTIZATION_NAMES[value]


def _options_struct(options: dict) -> Struct:
    struct = Struct()
    struct.update(json.loads(json.dumps(options, default=str)))  # plain JSON values only
    return struct


def _struct_options(request: pb.LoadModelRequest) -> dict:
    """google.protobuf.Struct carries every number as a double; whole ones become ints so that
    options such as top_k keep their integer meaning."""
    try:
        values = json_format.MessageToDict(request.default_options)
    except ValueError as exc:  # NaN / Infinity: JSON (and so Struct) has no such numbers
        raise InvalidParameter(f"default_options: {exc}") from None
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in values.items()}


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, app: App):
        self.app = app

    def _info(self, entry: ModelEntry) -> pb.ModelInfo:
        return model_info(entry, self.app.manager.is_default(entry))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        task = task_from_proto(request.task) if request.HasField("task") else None
        return pb.ListModelsResponse(models=[self._info(e) for e in self.app.manager.entries(task)])

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=self._info(self.app.manager.get(request.model)))

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        check_model_name(request.model)
        if request.HasField("revision"):
            check_model_name(request.revision, field="revision")
        if not request.model.strip():
            raise InvalidParameter("LoadModel needs a model: a local directory or a Hub id")
        manager = self.app.manager
        dtype = _dtype_field(request, "dtype")
        weights_dtype = _dtype_field(request, "weights_dtype")
        quantization = _quantization_field(request)
        # allow_pickle is a ceiling (load_options refuses raising it); the others are choices.
        options = manager.load_options(
            device=request.device if request.HasField("device") else None,
            dtype=dtype,
            weights_dtype=weights_dtype,
            load_in_8bit=request.load_in_8bit if request.HasField("load_in_8bit") else None,
            quantization=quantization,
            allow_pickle=request.allow_pickle if request.HasField("allow_pickle") else None,
            defaults=_struct_options(request) if request.HasField("default_options") else None,
        )
        chosen = [name for name, given in [("device", request.HasField("device")), ("dtype", dtype is not None),
                                           ("weights_dtype", weights_dtype is not None),
                                           ("load_in_8bit", request.HasField("load_in_8bit")),
                                           ("quantization", quantization is not None),
                                           ("revision", request.HasField("revision")),
                                           ("defaults", request.HasField("default_options"))] if given]
        entry = await manager.load(
            request.model,
            revision=request.revision if request.HasField("revision") else None,
            task=task_from_proto(request.task) if request.HasField("task") else None,
            options=options,
            # Without set_default, the first model of a task still becomes its default.
            set_default=True if request.set_default else None,
            chosen=chosen,
            within_root=True,
        )
        return pb.LoadModelResponse(model=self._info(entry))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        entry = await self.app.manager.unload(request.model)
        info = self._info(entry)
        return pb.UnloadModelResponse(model=info)


def register(server, app: App) -> None:
    pb_grpc.add_ModelServiceServicer_to_server(ModelServicer(app), server)
