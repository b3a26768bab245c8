"""fedatlas.coordinator: the operator's side (reference releases; registry and server to come)."""
