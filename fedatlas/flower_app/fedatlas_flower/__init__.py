"""fedatlas' Flower app: adaptor campaigns and federated reference builds."""
