// Typed errors: one class per gRPC status documented in protos/pipeserve/v1/common.proto,
// each carrying the google.rpc.ErrorInfo reason and metadata decoded from the
// grpc-status-details-bin trailer.

import grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';

// google.rpc.Status and google.rpc.ErrorInfo, declared inline: two small messages do not
// justify shipping googleapis' .proto files.
const rpc = protobuf.Root.fromJSON(/** @type {any} */ ({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
          },
        },
      },
    },
  },
}));
const Status = rpc.lookupType('google.rpc.Status');
const ErrorInfo = rpc.lookupType('google.rpc.ErrorInfo');

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** Base of every error the client raises. */
export class PipeserveError extends Error {
  /**
   * @param {string} details  the server's message
   * @param {{code?: number, reason?: string, metadata?: Record<string, string>, method?: string}} [info]
   */
  constructor(details, { code, reason = '', metadata = {}, method = '' } = {}) {
    super(details);
    this.name = new.target.name;
    this.details = details;
    /** @type {number|undefined} the gRPC status code */
    this.code = code;
    /** @type {string} e.g. "UNAVAILABLE" */
    this.codeName = code === undefined ? '' : CODE_NAMES[code];
    /** @type {string} the ErrorInfo reason, e.g. "QUEUE_FULL" */
    this.reason = reason;
    /** @type {Record<string, string>} the ErrorInfo metadata, e.g. {field: "top_k"} */
    this.metadata = metadata;
    this.method = method;
    /** @type {number|undefined} the failed input's position when a task method was given an array */
    this.index = undefined;
  }

  /** Whether common.proto documents the failure as safe to retry. */
  get retryable() {
    return isRetryable(this);
  }
}

/** An input could not be read on the client (missing file, wrong type); nothing was sent. */
export class InputError extends PipeserveError {
  constructor(details, { file = false } = {}) {
    super(details);
    /** Whether the problem is a local file (missing, unreadable). */
    this.file = file;
  }
}

export class InvalidArgumentError extends PipeserveError {}
export class NotFoundError extends PipeserveError {}
export class FailedPreconditionError extends PipeserveError {}
export class PermissionDeniedError extends PipeserveError {}
export class UnauthenticatedError extends PipeserveError {}
export class ResourceExhaustedError extends PipeserveError {}
export class UnavailableError extends PipeserveError {}
export class UnimplementedError extends PipeserveError {}
export class CancelledError extends PipeserveError {}
export class DeadlineExceededError extends PipeserveError {}
export class InternalError extends PipeserveError {}

/** The connection broke after a stream delivered `received` messages; never retried. */
export class StreamInterruptedError extends UnavailableError {
  constructor(details, info = {}) {
    super(details, info);
    this.received = info.received ?? 0;
  }

  get retryable() {
    return false;
  }
}

const BY_CODE = {
  [grpc.status.INVALID_ARGUMENT]: InvalidArgumentError,
  [grpc.status.OUT_OF_RANGE]: InvalidArgumentError,
  [grpc.status.NOT_FOUND]: NotFoundError,
  [grpc.status.FAILED_PRECONDITION]: FailedPreconditionError,
  [grpc.status.PERMISSION_DENIED]: PermissionDeniedError,
  [grpc.status.UNAUTHENTICATED]: UnauthenticatedError,
  [grpc.status.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [grpc.status.UNAVAILABLE]: UnavailableError,
  [grpc.status.UNIMPLEMENTED]: UnimplementedError,
  [grpc.status.CANCELLED]: CancelledError,
  [grpc.status.DEADLINE_EXCEEDED]: DeadlineExceededError,
};

/** UNAVAILABLE always; RESOURCE_EXHAUSTED only with reason QUEUE_FULL (common.proto). */
export function isRetryable(error) {
  if (error instanceof StreamInterruptedError) return false;
  return error.code === grpc.status.UNAVAILABLE
    || (error.code === grpc.status.RESOURCE_EXHAUSTED && error.reason === 'QUEUE_FULL');
}

function errorInfo(metadata) {
  const raw = metadata?.get?.('grpc-status-details-bin')?.[0];
  if (!raw) return { reason: '', metadata: {} };
  try {
    const status = /** @type {any} */ (Status.decode(raw));
    for (const detail of status.details) {
      if (detail.type_url.endsWith('/google.rpc.ErrorInfo')) {
        const info = /** @type {any} */ (ErrorInfo.decode(detail.value));
        return { reason: info.reason, metadata: { ...info.metadata } };
      }
    }
  } catch {
    // A malformed trailer is no reason to hide the status itself.
  }
  return { reason: '', metadata: {} };
}

/**
 * A grpc-js ServiceError -> the typed PipeserveError.
 * @param {any} error
 * @param {string} [method]
 * @param {number} [received] messages a stream delivered before failing
 */
export function errorFromStatus(error, method = '', received = 0) {
  if (error instanceof PipeserveError) return error;
  const code = typeof error?.code === 'number' ? error.code : grpc.status.UNKNOWN;
  const details = error?.details || error?.message || CODE_NAMES[code];
  const { reason, metadata } = errorInfo(error?.metadata);
  if (received && !reason && [grpc.status.UNAVAILABLE, grpc.status.INTERNAL, grpc.status.UNKNOWN].includes(code)) {
    return new StreamInterruptedError(details, { code: grpc.status.UNAVAILABLE, method, received });
  }
  const Class = BY_CODE[code] ?? InternalError;
  return new Class(details, { code, reason, metadata, method });
}
