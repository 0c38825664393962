"""The HTTP methods a tornado handler answers: every 405 names them in ``Allow`` (RFC 9110) and its message."""

from tornado import web


def allowed(handler: web.RequestHandler) -> list[str]:
    """The methods ``handler`` answers: its ``allow`` where a route takes fewer than its class implements, else
    the methods its class implements (tornado's own defaults answer 405)."""
    if (own := getattr(handler, "allow", None)) is not None:
        return list(own)
    cls = type(handler)
    return [
        m
        for m in cls.SUPPORTED_METHODS
        if getattr(cls, m.lower(), None) is not getattr(web.RequestHandler, m.lower(), None)
    ]


def allow(handler: web.RequestHandler) -> list[str]:
    """Set ``Allow`` on a 405 answer; returns the methods."""
    methods = allowed(handler)
    handler.set_header("Allow", ", ".join(methods))
    return methods


def refuse(handler: web.RequestHandler) -> str:
    """Set ``Allow`` on a 405 answer and return its message."""
    return f"{handler.request.method} is not allowed here; use {', '.join(allow(handler)) or 'nothing'}"
