"""fedatlas' Flower app with a ServerApp that records what the sites send."""
