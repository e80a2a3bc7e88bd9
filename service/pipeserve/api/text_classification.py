"""TextClassificationService: ClassifyTextRequest -> pipeline.classify -> ClassifyTextResponse
(the image_classification servicer's pattern: the set option fields built into the task's
options, the item submitted to the dynamic batcher, no torch here)."""
from __future__ import annotations

from ..pipelines.text_classification import TextInput
from ..tasks import Task
from ..v1 import common_pb2, text_classification_pb2 as pb, text_classification_pb2_grpc as pb_grpc
from . import limits
from .common import App, enum_option, optional_fields, request_id, run_info

TASK = Task.TEXT_CLASSIFICATION
SERVICE_NAME = "pipeserve.v1.TextClassificationService"


class TextClassificationServicer(pb_grpc.TextClassificationServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def ClassifyText(self, request: pb.ClassifyTextRequest, context) -> pb.ClassifyTextResponse:
        rid = request_id(request)
        limits.check(request)
        item = TextInput(request.text, request.text_pair if request.HasField("text_pair") else None)
        fields = optional_fields(request, ["top_k"])
        fields["function_to_apply"] = enum_option(request, "function_to_apply", "FUNCTION_TO_APPLY_")
        async with self.app.manager.use(request.model, TASK) as entry:
            result = await self.app.batched(entry, item, entry.pipeline.options(fields))
        return pb.ClassifyTextResponse(
            request_id=rid,
            labels=[common_pb2.ScoredLabel(label=label, score=score) for label, score in result.value],
            run=run_info(entry, batch=result),
        )


def register(server, app: App) -> None:
    pb_grpc.add_TextClassificationServiceServicer_to_server(TextClassificationServicer(app), server)
