"""Service short names -> generated stub classes (the same for sync and asyncio channels)."""
from __future__ import annotations

import importlib

_STUBS = {
    "models": ("model_pb2_grpc", "ModelServiceStub"),
    "speech": ("speech_recognition_pb2_grpc", "SpeechRecognitionServiceStub"),
    "generation": ("text_generation_pb2_grpc", "TextGenerationServiceStub"),
    "image": ("image_classification_pb2_grpc", "ImageClassificationServiceStub"),
    "zero_shot": ("zero_shot_classification_pb2_grpc", "ZeroShotClassificationServiceStub"),
    "document_qa": ("document_question_answering_pb2_grpc", "DocumentQuestionAnsweringServiceStub"),
    "text": ("text_classification_pb2_grpc", "TextClassificationServiceStub"),
    "tokens": ("token_classification_pb2_grpc", "TokenClassificationServiceStub"),
    "qa": ("question_answering_pb2_grpc", "QuestionAnsweringServiceStub"),
    "fill_mask": ("fill_mask_pb2_grpc", "FillMaskServiceStub"),
    "features": ("feature_extraction_pb2_grpc", "FeatureExtractionServiceStub"),
}


def make_stub(service: str, channel):
    module, cls = _STUBS[service]
    return getattr(importlib.import_module(f"pipeserve.v1.{module}"), cls)(channel)


def service_descriptor(service: str):
    """The protobuf ServiceDescriptor behind a short name (its RPCs and their message types)."""
    module, cls = _STUBS[service]
    messages = importlib.import_module(f"pipeserve.v1.{module.removesuffix('_grpc')}")
    return messages.DESCRIPTOR.services_by_name[cls.removesuffix("Stub")]


def service_names() -> tuple[str, ...]:
    return tuple(_STUBS)


class StubCache:
    """One stub per service, created on first use."""

    def __init__(self, channel) -> None:
        self.channel = channel
        self._stubs: dict[str, object] = {}

    def method(self, service: str, name: str):
        stub = self._stubs.get(service)
        if stub is None:
            stub = self._stubs[service] = make_stub(service, self.channel)
        return getattr(stub, name)
