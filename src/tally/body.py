"""The request body: read whole and checked before anything acts on it."""

from __future__ import annotations

import io
from typing import IO

from flask import Request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import BadRequest, ClientDisconnected, RequestEntityTooLarge

#: Bytes asked of the server per read; bodies here are small forms.
_READ_SIZE = 64 * 1024


def read_whole(request: Request) -> None:
    """Read the body now: a malformed, oversized or cut-short one is a 4xx before any change.

    Werkzeug alone does not catch these under gunicorn, which marks its input as
    terminated: werkzeug then stops silently at ``MAX_CONTENT_LENGTH`` on a
    chunked body (so the truncated form was acted on), never compares what
    arrived with ``Content-Length``, and lets gunicorn's chunk parse errors
    escape as 500s.  Reading the few KiB up front settles all three in one place.
    """
    environ = request.environ
    if "HTTP_TRANSFER_ENCODING" not in environ and environ.get("CONTENT_LENGTH", "0") in ("", "0"):
        return  # no body: the usual GET pays nothing
    length = request.content_length  # None when chunked
    if not length and "HTTP_TRANSFER_ENCODING" not in environ:
        return
    limit = request.max_content_length
    if length is not None and limit is not None and length > limit:
        raise _too_large(limit)
    body = _read(environ["wsgi.input"], length, limit)
    if length is not None and len(body) < length:
        raise ClientDisconnected(
            f"the request body ended after {len(body)} of the {length} bytes its Content-Length announced;"
            " nothing was changed"
        )
    # Werkzeug's form parser reads from here now: the checked bytes, nothing more.
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))


def _read(stream: IO[bytes], length: int | None, limit: int | None) -> bytes:
    # Never ask past Content-Length: a server that does not end the stream
    # there (werkzeug's own) would wait for bytes that never come.  A chunked
    # body is read one byte past the limit, to know that it is over it.
    wanted = length if length is not None else None if limit is None else limit + 1
    parts: list[bytes] = []
    got = 0
    while wanted is None or got < wanted:
        try:
            data = stream.read(_READ_SIZE if wanted is None else min(_READ_SIZE, wanted - got))
        except ParseException as exc:  # gunicorn: a bad chunk size, extension, terminator or trailer
            raise BadRequest("the request body is not valid chunked encoding; nothing was changed") from exc
        except (OSError, ValueError) as exc:  # the client went away, or the stream is closed
            raise ClientDisconnected("the request body ended before it was complete; nothing was changed") from exc
        if not data:
            break
        parts.append(data)
        got += len(data)
    if limit is not None and got > limit:
        raise _too_large(limit)
    return b"".join(parts)


def _too_large(limit: int) -> RequestEntityTooLarge:
    return RequestEntityTooLarge(f"the request body is over {limit} bytes; nothing was changed")
