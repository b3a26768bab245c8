"""fedatlas' ClientApp, then one byte of the first tensor of the signed bundle is flipped."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedatlas.shared.wire.messages import BUNDLE_RECORD
from fedatlas.site_client.campaign import train
from fedatlas.v1 import coordinator_pb2 as pb

app = ClientApp()


@app.train()
def handle(message: Message, context: Context) -> Message:
    """Answer with a bundle altered after signing."""
    honest = train(message, context).content[BUNDLE_RECORD]
    bundle = pb.Bundle.FromString(bytes(honest["bundle"]))
    data = bundle.tensors[0].data
    bundle.tensors[0].data = bytes([data[0] ^ 1]) + data[1:]
    altered = ConfigRecord({"bundle": bundle.SerializeToString(), "site-id": honest["site-id"]})
    return Message(RecordDict({BUNDLE_RECORD: altered}), reply_to=message)
