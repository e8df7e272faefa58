"""JSON responses shared by the server's own endpoints and the generation path."""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Optional

from aiohttp import web

from jaxvllm.entrypoints.openai.protocol import APIError

logger = logging.getLogger("jaxvllm.server")


def json_response(obj: Any, status: int = 200, headers: Optional[dict] = None) -> web.Response:
    return web.Response(text=json.dumps(obj, allow_nan=False), status=status,
                        content_type="application/json", headers=headers)


def error_response(e: APIError) -> web.Response:
    return json_response(e.body(), e.status, e.headers)


def internal_error(what: str) -> APIError:
    """Log the exception being handled as a server bug and return the 500 that reports it. The id,
    in both the log line and the client's message, lets an operator find the traceback a client
    reports (as OpenAI's own 500s carry a request id)."""
    error_id = f"err-{uuid.uuid4().hex[:16]}"
    logger.exception("internal error %s %s", error_id, what)
    return APIError(f"Internal server error (error id {error_id}).", 500, "InternalServerError")
