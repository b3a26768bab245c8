"""fedatlas' own ServerApp (the run configuration's ``task`` names the federated build)."""

from fedatlas.flower_app.fedatlas_flower.server_app import app

__all__ = ["app"]
