"""JSON responses shared by the server's own endpoints and the generation path."""
from __future__ import annotations

import json
from typing import Any, Optional

from aiohttp import web

from jaxvllm.entrypoints.openai.protocol import APIError


def json_response(obj: Any, status: int = 200, headers: Optional[dict] = None) -> web.Response:
    return web.Response(text=json.dumps(obj, allow_nan=False), status=status,
                        content_type="application/json", headers=headers)


def error_response(e: APIError) -> web.Response:
    return json_response(e.body(), e.status, e.headers)
