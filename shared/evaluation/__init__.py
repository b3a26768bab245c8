"""Scores and figures of a mapping (integration, label transfer, unknown detection)."""
