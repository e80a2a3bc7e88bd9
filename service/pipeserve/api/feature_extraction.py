"""FeatureExtractionService: ExtractFeaturesRequest -> pipeline.extract -> ExtractFeaturesResponse
(the image_classification servicer's pattern; vectors leave as lists of floats)."""
from __future__ import annotations

from ..tasks import Task
from ..v1 import feature_extraction_pb2 as pb, feature_extraction_pb2_grpc as pb_grpc
from . import limits
from .common import App, enum_option, optional_fields, request_id, run_info

TASK = Task.FEATURE_EXTRACTION
SERVICE_NAME = "pipeserve.v1.FeatureExtractionService"


class FeatureExtractionServicer(pb_grpc.FeatureExtractionServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def ExtractFeatures(self, request: pb.ExtractFeaturesRequest, context) -> pb.ExtractFeaturesResponse:
        rid = request_id(request)
        limits.check(request)
        fields = optional_fields(request, ["normalize", "truncate"])
        fields["pooling"] = enum_option(request, "pooling", "POOLING_")
        async with self.app.manager.use(request.model, TASK) as entry:
            result = await self.app.batched(entry, request.text, entry.pipeline.options(fields))
        features = result.value
        response = pb.ExtractFeaturesResponse(request_id=rid, dimensions=features.dimensions, tokens=features.tokens,
                                              run=run_info(entry, batch=result))
        if features.sentence_embedding is not None:
            response.sentence_embedding.values.extend(features.sentence_embedding.tolist())
        else:
            response.token_embeddings.extend(pb.Embedding(values=row) for row in features.token_embeddings.tolist())
        return response


def register(server, app: App) -> None:
    pb_grpc.add_FeatureExtractionServiceServicer_to_server(FeatureExtractionServicer(app), server)
