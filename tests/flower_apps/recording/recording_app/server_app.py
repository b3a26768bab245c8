"""fedatlas' own ServerApp, given a grid that records every reply the sites send: per reply
its message type, sender node and content (record -> field -> value; bytes as base64), written
to ``REPORT.messages.json`` when the run ends."""

import base64
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedatlas.coordinator.campaign import run_campaign
from fedatlas.coordinator.federated_build import run_federated_build


def _value(value: Any) -> Any:
    """A record value as JSON: bytes as {"bytes": base64}, lists element by element."""
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_value(v) for v in value]
    return value


def recorded(reply: Message) -> dict[str, Any]:
    """What the ServerApp received in ``reply``."""
    entry: dict[str, Any] = {
        "type": reply.metadata.message_type,
        "node": int(reply.metadata.src_node_id),
        "error": str(reply.error) if reply.has_error() else "",
        "records": {},
    }
    if not reply.has_error():
        for name, record in reply.content.items():
            kind = type(record).__name__
            fields = (
                {k: _value(v) for k, v in record.items()}
                if isinstance(record, ConfigRecord)
                else {}
            )
            entry["records"][name] = {"kind": kind, "fields": fields, "keys": sorted(record.keys())}
    return entry


class RecordingGrid:
    """A grid that hands every reply of ``send_and_receive`` to the ServerApp and keeps it."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.replies: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """The grid's replies, each recorded."""
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(recorded(r) for r in replies)
        return replies


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run fedatlas' task on a recording grid; write what the sites sent."""
    recording = RecordingGrid(grid)
    try:
        if str(context.run_config.get("task", "campaign")) == "federated-build":
            run_federated_build(recording, context)  # type: ignore[arg-type]
        else:
            run_campaign(recording, context)  # type: ignore[arg-type]
    finally:
        path = Path(str(context.run_config["report"]) + ".messages.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recording.replies))
