"""fedatlas' own campaign ServerApp."""

from flwr.serverapp import Grid, ServerApp

from fedatlas.coordinator.campaign import run_campaign

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:  # type: ignore[no-untyped-def]
    """Run one adaptor campaign."""
    run_campaign(grid, context)
