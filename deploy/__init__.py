"""What an operator runs: the local launcher, the demo, bootstrap and service files."""
