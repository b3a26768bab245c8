"""ServerApp: an adaptor campaign, or a federated reference build (run config ``task``)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedatlas.coordinator.campaign import run_campaign
from fedatlas.coordinator.federated_build import run_federated_build

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the task the run configuration names."""
    if str(context.run_config.get("task", "campaign")) == "federated-build":
        run_federated_build(grid, context)
    else:
        run_campaign(grid, context)
