"""ZeroShotClassificationService: ClassifyZeroShotRequest -> pipeline.classify ->
ClassifyZeroShotResponse, batched with concurrent callers that share the same options."""
from __future__ import annotations

from ..pipelines.zero_shot_classification import ZeroShotRequest
from ..tasks import Task
from ..v1 import common_pb2, zero_shot_classification_pb2 as pb, zero_shot_classification_pb2_grpc as pb_grpc
from . import limits
from .common import App, optional_fields, request_id, run_info

TASK = Task.ZERO_SHOT_CLASSIFICATION
SERVICE_NAME = "pipeserve.v1.ZeroShotClassificationService"


class ZeroShotClassificationServicer(pb_grpc.ZeroShotClassificationServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def ClassifyZeroShot(self, request: pb.ClassifyZeroShotRequest, context) -> pb.ClassifyZeroShotResponse:
        rid = request_id(request)
        limits.check(request)
        item = ZeroShotRequest(request.sequence, tuple(request.candidate_labels))
        fields = optional_fields(request, ["hypothesis_template", "multi_label", "truncation"])
        async with self.app.manager.use(request.model, TASK) as entry:
            result = await self.app.batched(entry, item, entry.pipeline.options(fields))
        return pb.ClassifyZeroShotResponse(
            request_id=rid,
            sequence=result.value.sequence,
            labels=[common_pb2.ScoredLabel(label=label, score=score) for label, score in result.value.labels],
            run=run_info(entry, batch=result),
        )


def register(server, app: App) -> None:
    pb_grpc.add_ZeroShotClassificationServiceServicer_to_server(ZeroShotClassificationServicer(app), server)
