"""FillMaskService: FillMaskRequest -> pipeline.fill -> FillMaskResponse
(the image_classification servicer's pattern)."""
from __future__ import annotations

from ..tasks import Task
from ..v1 import fill_mask_pb2 as pb, fill_mask_pb2_grpc as pb_grpc
from . import limits
from .common import App, optional_fields, request_id, run_info

TASK = Task.FILL_MASK
SERVICE_NAME = "pipeserve.v1.FillMaskService"


class FillMaskServicer(pb_grpc.FillMaskServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def FillMask(self, request: pb.FillMaskRequest, context) -> pb.FillMaskResponse:
        rid = request_id(request)
        limits.check(request)
        fields = optional_fields(request, ["top_k"])
        fields["targets"] = list(request.targets) or None
        async with self.app.manager.use(request.model, TASK) as entry:
            result = await self.app.batched(entry, request.text, entry.pipeline.options(fields))
        return pb.FillMaskResponse(
            request_id=rid,
            masks=[pb.MaskPrediction(candidates=[
                pb.FillCandidate(score=c.score, token=c.token, token_str=c.token_str, sequence=c.sequence)
                for c in mask]) for mask in result.value],
            run=run_info(entry, batch=result),
        )


def register(server, app: App) -> None:
    pb_grpc.add_FillMaskServiceServicer_to_server(FillMaskServicer(app), server)
