"""fedatlas.coordinator: the coordinator (registry, verification, services, admin commands)."""
