"""fedatlas' Flower app: the adaptor campaign (see fedatlas.coordinator.campaign)."""
