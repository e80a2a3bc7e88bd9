"""ImageClassificationService: ClassifyImageRequest -> pipeline.classify -> ClassifyImageResponse.

The pattern every servicer follows: read the request into Python values (the set option
fields as {field: value or None}), borrow the model from the manager, build the task's frozen
options once (`entry.pipeline.options(fields)`: the model's defaults, then the request's,
checked), submit the item to the dynamic batcher (`app.batched(entry, item, options)`, which
runs the pipeline's `run_batch` on the worker pool with concurrent callers' items that share
those options), and build the response. Streaming calls use `iterate_in_thread` instead.
No torch here; errors are raised as typed PipeserveErrors and mapped to statuses by the
interceptor.
"""
from __future__ import annotations

from ..tasks import Task
from ..v1 import common_pb2, image_classification_pb2 as pb, image_classification_pb2_grpc as pb_grpc
from . import limits
from .common import App, enum_option, input_bytes, optional_fields, request_id, run_info

TASK = Task.IMAGE_CLASSIFICATION
SERVICE_NAME = "pipeserve.v1.ImageClassificationService"


class ImageClassificationServicer(pb_grpc.ImageClassificationServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def ClassifyImage(self, request: pb.ClassifyImageRequest, context) -> pb.ClassifyImageResponse:
        rid = request_id(request)
        limits.check(request)
        image = await input_bytes(self.app, data=request.image.data, uri=request.image.uri,
                                  which="image", max_bytes=self.app.settings.max_message_bytes)
        fields = optional_fields(request, ["top_k"])
        fields["function_to_apply"] = enum_option(request, "function_to_apply", "FUNCTION_TO_APPLY_")
        async with self.app.manager.use(request.model, TASK) as entry:
            result = await self.app.batched(entry, image, entry.pipeline.options(fields))
        return pb.ClassifyImageResponse(
            request_id=rid,
            labels=[common_pb2.ScoredLabel(label=label, score=score) for label, score in result.value],
            run=run_info(entry, batch=result),
        )


def register(server, app: App) -> None:
    pb_grpc.add_ImageClassificationServiceServicer_to_server(ImageClassificationServicer(app), server)
