"""The HTTP edge: parse, authorize, call a service function, shape the reply."""

from overnight.api.app import create_app

__all__ = ["create_app"]
