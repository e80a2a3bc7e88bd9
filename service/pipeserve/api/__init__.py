"""Thin servicers: protobuf -> domain call -> protobuf, one module per gRPC service.

A servicer validates request sizes (limits), converts the request to the pipeline's input and
options, submits it through the batcher or the compute lane and converts the result back; it
holds no torch code. App (common) is what every servicer shares: settings, manager, batcher.

May import: core, contracts, checkpoints, inputs, scheduling, runtime, pipelines.
"""
