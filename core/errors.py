"""Specific error types. The gRPC edge maps each to a status code (offsite.cloud.service)."""


class OffsiteError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(OffsiteError):
    """A configuration value is invalid."""


class UnsupportedModelError(OffsiteError):
    """The model's structure cannot be split."""


class DataError(OffsiteError):
    """A data file is missing or malformed; the message names the file and line."""


class IntegrityError(OffsiteError):
    """Bytes do not match the hash that was promised for them."""


class AuthError(OffsiteError):
    """Unknown, reused or expired credential."""


class NotFoundError(OffsiteError):
    """The named job, blob or client does not exist."""


class PreconditionError(OffsiteError):
    """The request is well formed but not valid now (wrong job or round, round closed, job done)."""


class AlreadyExistsError(OffsiteError):
    """The thing was already accepted once (a replayed update)."""


class InvalidRequestError(OffsiteError):
    """A request field is malformed (a key, a CSR)."""


class InvalidUpdateError(OffsiteError):
    """An uploaded update failed a check (seal, signature, tensor names, shapes, dtypes, values)."""


class TooLargeError(OffsiteError):
    """An upload is larger than the job allows."""


class QuotaError(TooLargeError):
    """A quota is full: the upload spool, or one client's share of it."""


class OutOfRangeError(OffsiteError):
    """A position past the end of what exists (a chunk index beyond the last chunk)."""


class AbortedError(OffsiteError):
    """A protocol run could not finish (secure aggregation left with fewer clients than its threshold)."""


def shown(value: object, limit: int = 32) -> str:
    """A client-supplied value as it may appear in an error or a log line: its repr, cut to `limit`
    characters with its full length said, so that no message echoes unbounded input back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value) if hasattr(value, '__len__') else len(text)} long)"
