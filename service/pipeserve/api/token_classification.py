"""TokenClassificationService: ClassifyTokensRequest -> pipeline.classify -> ClassifyTokensResponse
(the image_classification servicer's pattern)."""
from __future__ import annotations

from ..tasks import Task
from ..v1 import token_classification_pb2 as pb, token_classification_pb2_grpc as pb_grpc
from . import limits
from .common import App, enum_option, optional_fields, request_id, run_info

TASK = Task.TOKEN_CLASSIFICATION
SERVICE_NAME = "pipeserve.v1.TokenClassificationService"


class TokenClassificationServicer(pb_grpc.TokenClassificationServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def ClassifyTokens(self, request: pb.ClassifyTokensRequest, context) -> pb.ClassifyTokensResponse:
        rid = request_id(request)
        limits.check(request)
        fields = optional_fields(request, ["stride"])
        fields["aggregation_strategy"] = enum_option(request, "aggregation_strategy", "AGGREGATION_STRATEGY_")
        fields["ignore_labels"] = list(request.ignore_labels) or None
        async with self.app.manager.use(request.model, TASK) as entry:
            result = await self.app.batched(entry, request.text, entry.pipeline.options(fields))
        return pb.ClassifyTokensResponse(
            request_id=rid,
            entities=[pb.Entity(entity=e.entity, score=e.score, word=e.word, start=e.start, end=e.end, index=e.index)
                      for e in result.value],
            run=run_info(entry, batch=result),
        )


def register(server, app: App) -> None:
    pb_grpc.add_TokenClassificationServiceServicer_to_server(TokenClassificationServicer(app), server)
