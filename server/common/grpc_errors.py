"""The one place that maps domain errors to gRPC status codes with rich details.

Servicer methods are wrapped with `@grpc_method`; a DomainError becomes the
matching canonical code with google.rpc details (BadRequest, ErrorInfo,
RetryInfo), sent through grpcio-status. Anything else is a bug on our side: it
is logged and answered INTERNAL without internals leaking to the caller.
The union's Connect/gRPC-Web port (server/union/api/connect.py) sends the same
`to_status` code, message and details: one mapping for both transports.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.common import errors

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _retry_info(retry_after: timedelta) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromTimedelta(max(retry_after, timedelta(seconds=1)))
    return _pack(error_details_pb2.RetryInfo(retry_delay=delay))


def _error_info(reason: str, metadata: dict[str, str]) -> any_pb2.Any:
    return _pack(error_details_pb2.ErrorInfo(reason=reason, domain=errors.ERROR_DOMAIN, metadata=metadata))


def to_status(error: errors.DomainError) -> status_pb2.Status:
    """Build the google.rpc.Status for a domain error."""
    details: list[any_pb2.Any] = []
    code: int
    match error:
        case errors.InvalidArgument():
            code = code_pb2.INVALID_ARGUMENT
            details.append(
                _pack(
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(
                                field=v.field, description=v.description
                            )
                            for v in error.violations
                        ]
                    )
                )
            )
        case errors.NotFound():
            code = code_pb2.NOT_FOUND
        case errors.Unauthenticated():
            code = code_pb2.UNAUTHENTICATED
            details.append(_error_info(error.reason, error.metadata))
        case errors.PermissionDenied():
            code = code_pb2.PERMISSION_DENIED
            details.append(_error_info(error.reason, error.metadata))
        case errors.FailedPrecondition():
            code = code_pb2.FAILED_PRECONDITION
            details.append(_error_info(error.reason, error.metadata))
        case errors.ResourceExhausted():
            code = code_pb2.RESOURCE_EXHAUSTED
            details.append(_error_info(error.reason, error.metadata))
            if error.retry_after is not None:
                details.append(_retry_info(error.retry_after))
        case errors.AlreadyExists():
            code = code_pb2.ALREADY_EXISTS
            details.append(_error_info(error.reason, {}))
        case errors.Unavailable():
            code = code_pb2.UNAVAILABLE
            if error.retry_after is not None:
                details.append(_retry_info(error.retry_after))
        case _:
            code = code_pb2.INTERNAL
    return status_pb2.Status(code=code, message=error.message, details=details)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: errors.DomainError) -> None:
    """Abort the call with the rich status for `error` (raises AbortError)."""
    status = rpc_status.to_status(to_status(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


def grpc_method(method: F) -> F:
    """Wrap a servicer method (unary or async-generator) so domain errors become statuses."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except errors.DomainError as error:
                await abort(context, error)
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unhandled error in %s", method.__qualname__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return cast(F, stream_wrapper)

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)
        except errors.DomainError as error:
            await abort(context, error)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error in %s", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return cast(F, unary_wrapper)
