"""A Flower app for the tests that records what the coordinator receives in a federated build."""
