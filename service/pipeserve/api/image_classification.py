"""ImageClassificationService: ClassifyImageRequest -> pipeline.classify -> ClassifyImageResponse.

The pattern every servicer follows: read the request into Python values (options as
{field: value or None}), borrow the model from the manager, run the blocking pipeline call on
the worker pool, and build the response. No torch here; errors are raised as typed
PipeserveErrors and mapped to statuses by the interceptor.
"""
from __future__ import annotations

from ..tasks import Task
from ..v1 import common_pb2, image_classification_pb2 as pb, image_classification_pb2_grpc as pb_grpc
from .common import App, Timer, enum_option, input_bytes, optional_fields, request_id, run_info

TASK = Task.IMAGE_CLASSIFICATION
SERVICE_NAME = "pipeserve.v1.ImageClassificationService"


class ImageClassificationServicer(pb_grpc.ImageClassificationServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def ClassifyImage(self, request: pb.ClassifyImageRequest, context) -> pb.ClassifyImageResponse:
        rid = request_id(request)
        timer = Timer()
        image = await input_bytes(self.app, data=request.image.data, uri=request.image.uri,
                                  which="image", max_bytes=self.app.settings.max_message_bytes)
        options = optional_fields(request, ["top_k"])
        options["function_to_apply"] = enum_option(request, "function_to_apply", "FUNCTION_TO_APPLY_")
        async with self.app.manager.use(request.model, TASK) as entry:
            queue_ms = timer.ms()
            [labels] = await self.app.manager.run(entry.pipeline.classify, [image], options)
            compute_ms = timer.ms() - queue_ms
        return pb.ClassifyImageResponse(
            request_id=rid,
            labels=[common_pb2.ScoredLabel(label=label, score=score) for label, score in labels],
            run=run_info(entry, queue_ms=queue_ms, compute_ms=compute_ms),
        )


def register(server, app: App) -> None:
    pb_grpc.add_ImageClassificationServiceServicer_to_server(ImageClassificationServicer(app), server)
