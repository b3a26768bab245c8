"""fedatlas' own ServerApp, given a grid that records every reply it receives (Flower's
protobuf bytes of the content, ``REPORT.received/NNNN-TYPE-NODE.pb``) and counts the messages
and bytes it moves both ways (``REPORT.traffic.json``)."""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from fedatlas.coordinator.federated_build import run_federated_build


def _size(message: Message) -> int:
    return len(recorddict_to_proto(message.content).SerializeToString())


class RecordingGrid:
    """A grid that passes everything on and records the replies of ``send_and_receive``."""

    def __init__(self, grid: Grid, folder: Path) -> None:
        self._grid, self.folder = grid, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.traffic = {"messages_sent": 0, "bytes_sent": 0, "replies": 0, "bytes_received": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """The grid's replies, each recorded."""
        messages = list(messages)
        self.traffic["messages_sent"] += len(messages)
        self.traffic["bytes_sent"] += sum(_size(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                continue
            data = recorddict_to_proto(reply.content).SerializeToString()
            self.traffic["replies"] += 1
            self.traffic["bytes_received"] += len(data)
            kind, node = reply.metadata.message_type, reply.metadata.src_node_id
            (self.folder / f"{self.traffic['replies']:04d}-{kind}-{node}.pb").write_bytes(data)
        return replies


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated build on a recording grid; write the traffic counts."""
    report = str(context.run_config["report"])
    recording = RecordingGrid(grid, Path(report + ".received"))
    try:
        run_federated_build(recording, context)  # type: ignore[arg-type]
    finally:
        Path(report + ".traffic.json").write_text(json.dumps(recording.traffic))
