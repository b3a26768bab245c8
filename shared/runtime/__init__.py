"""Running things: command-line helpers, Flower processes, process trees, virtual sites."""
