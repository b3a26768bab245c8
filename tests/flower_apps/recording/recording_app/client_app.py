"""fedatlas' own ClientApp, unchanged: the sites answer as they do in production."""

from fedatlas.flower_app.fedatlas_flower.client_app import app

__all__ = ["app"]
