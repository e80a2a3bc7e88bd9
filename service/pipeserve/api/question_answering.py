"""QuestionAnsweringService: AnswerQuestionRequest -> pipeline.answer -> AnswerQuestionResponse
(the image_classification servicer's pattern)."""
from __future__ import annotations

from ..pipelines.question_answering import QAInput
from ..tasks import Task
from ..v1 import question_answering_pb2 as pb, question_answering_pb2_grpc as pb_grpc
from . import limits
from .common import App, optional_fields, request_id, run_info

TASK = Task.QUESTION_ANSWERING
SERVICE_NAME = "pipeserve.v1.QuestionAnsweringService"
OPTIONS = ["top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len", "handle_impossible_answer",
           "align_to_words"]


class QuestionAnsweringServicer(pb_grpc.QuestionAnsweringServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def AnswerQuestion(self, request: pb.AnswerQuestionRequest, context) -> pb.AnswerQuestionResponse:
        rid = request_id(request)
        limits.check(request)
        fields = optional_fields(request, OPTIONS)
        async with self.app.manager.use(request.model, TASK) as entry:
            item = QAInput(request.question, request.context)
            result = await self.app.batched(entry, item, entry.pipeline.options(fields))
        return pb.AnswerQuestionResponse(
            request_id=rid,
            answers=[pb.Answer(answer=a.answer, score=a.score, start=a.start, end=a.end) for a in result.value],
            run=run_info(entry, batch=result),
        )


def register(server, app: App) -> None:
    pb_grpc.add_QuestionAnsweringServiceServicer_to_server(QuestionAnsweringServicer(app), server)
