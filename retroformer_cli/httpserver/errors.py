"""OpenAI's error body, which both servers answer with, and a request validation error as one sentence."""

from __future__ import annotations

import re
from typing import Any

from fastapi.exceptions import RequestValidationError

# pydantic's tags for union members in an error's location: not field names
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "TextPart"})


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of an invalid body as one sentence, and the parameter it concerns."""
    errors = exc.errors()
    if not errors:
        return "The request is invalid.", None
    first = errors[0]
    unknown = re.search(r"Unrecognized request argument supplied: ([\w, ]+)", str(first.get("msg", "")))
    if unknown:
        return f"Unrecognized request argument supplied: {unknown.group(1)}.", unknown.group(1).split(",")[0].strip()
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}).", None
    loc: list[str] = []
    for part in first.get("loc", ())[1:] if first.get("loc", ())[:1] == ("body",) else first.get("loc", ()):
        text = str(part)
        if text in _TYPE_TAGS or "[" in text or "-" in text:  # a union member's tag, not a field
            break
        loc.append(text)
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"Invalid value for '{param}': {first.get('msg')}{more}.", param
