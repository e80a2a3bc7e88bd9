"""DocumentQuestionAnsweringService: AnswerDocumentQuestionRequest -> pipeline.answer ->
AnswerDocumentQuestionResponse, batched with concurrent callers that share the same options.
The image is optional when the caller sends the page's words and boxes."""
from __future__ import annotations

from ..inputs.ocr import Word
from ..tasks import Task
from ..v1 import document_question_answering_pb2 as pb, document_question_answering_pb2_grpc as pb_grpc
from . import limits
from .common import App, input_bytes, optional_fields, request_id, run_info

TASK = Task.DOCUMENT_QUESTION_ANSWERING
SERVICE_NAME = "pipeserve.v1.DocumentQuestionAnsweringService"
OPTIONS = ["top_k", "max_answer_len", "doc_stride", "max_seq_len", "max_question_len",
           "handle_impossible_answer", "ocr_lang"]


def _box(box: pb.BoundingBox) -> tuple[int, int, int, int]:
    return (box.x0, box.y0, box.x1, box.y1)


class DocumentQuestionAnsweringServicer(pb_grpc.DocumentQuestionAnsweringServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def AnswerDocumentQuestion(self, request: pb.AnswerDocumentQuestionRequest,
                                     context) -> pb.AnswerDocumentQuestionResponse:
        # Imported here: the pipeline module imports PIL, which a server without this task's
        # model never needs at start (issue #16, cold start).
        from ..pipelines.document_question_answering import DocumentQuery

        rid = request_id(request)
        limits.check(request)
        image = None
        if request.HasField("image") and request.image.WhichOneof("source"):
            image = await input_bytes(self.app, data=request.image.data, uri=request.image.uri,
                                      which="image", max_bytes=self.app.settings.max_message_bytes)
        words = tuple(Word(w.text, _box(w.box)) for w in request.words) or None
        item = DocumentQuery(request.question, image=image, words=words)
        fields = optional_fields(request, OPTIONS)
        async with self.app.manager.use(request.model, TASK) as entry:
            result = await self.app.batched(entry, item, entry.pipeline.options(fields))
        return pb.AnswerDocumentQuestionResponse(
            request_id=rid,
            answers=[pb.DocumentAnswer(answer=a.answer, score=a.score, start_word=a.start_word, end_word=a.end_word)
                     for a in result.value.answers],
            words=[pb.DocumentWord(text=w.text, box=pb.BoundingBox(x0=w.box[0], y0=w.box[1], x1=w.box[2], y1=w.box[3]))
                   for w in result.value.words],
            run=run_info(entry, batch=result),
        )


def register(server, app: App) -> None:
    pb_grpc.add_DocumentQuestionAnsweringServiceServicer_to_server(DocumentQuestionAnsweringServicer(app), server)
