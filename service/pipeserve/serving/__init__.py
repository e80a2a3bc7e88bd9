"""Serving: the transport around the servicers.

Owns error mapping (interceptors), authentication and per-caller limits (security), access
logs, metrics and tracing (observability, metrics, tracing, logs), graceful draining (drain),
the startup gate (startup) and the process's OpenMP defaults (openmp_defaults). The entry
module pipeserve.server wires these, the servicers and the runtime into one grpc.aio server.

May import: core, contracts, checkpoints, runtime, api.
"""
