"""pipeserve: Hugging Face pipeline inference over gRPC, with native PyTorch model families."""

__version__ = "0.1.0"
