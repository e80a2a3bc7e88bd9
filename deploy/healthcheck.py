#!/usr/bin/env python3
"""Container health check: asks the server's grpc.health.v1 service for the overall status
("" = the process) over loopback and exits 0 only for SERVING. Docker's HEALTHCHECK runs it;
Kubernetes uses its native gRPC probes instead.

Reads the same environment as the server: PIPESERVE_LISTEN for the port, and with TLS on
(PIPESERVE_TLS_CERT) it trusts the server's own certificate, presenting
PIPESERVE_HEALTHCHECK_CLIENT_CERT / _KEY when the server requires client certificates.
PIPESERVE_HEALTHCHECK_SERVICE checks one service instead of the whole process."""
from __future__ import annotations

import os
import sys


def target() -> str:
    listen = os.environ.get("PIPESERVE_LISTEN", "127.0.0.1:50051")
    port = listen.rpartition(":")[2]
    return f"127.0.0.1:{port}"


def channel():
    import grpc

    cert = os.environ.get("PIPESERVE_TLS_CERT")
    if not cert:
        return grpc.insecure_channel(target())
    read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(cert),
        private_key=read(os.environ.get("PIPESERVE_HEALTHCHECK_CLIENT_KEY")),
        certificate_chain=read(os.environ.get("PIPESERVE_HEALTHCHECK_CLIENT_CERT")))
    # The certificate names the service's DNS name, not 127.0.0.1.
    name = os.environ.get("PIPESERVE_HEALTHCHECK_SERVER_NAME", "localhost")
    return grpc.secure_channel(target(), credentials, options=[("grpc.ssl_target_name_override", name)])


def main() -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    service = os.environ.get("PIPESERVE_HEALTHCHECK_SERVICE", "")
    try:
        with channel() as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=4)
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name} {exc.details()}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    print(name)
    return 0 if status.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
