"""fedatlas' campaign ClientApp, except at two hostile sites: ``h1`` flips one byte of the
signed body, ``h2`` re-signs (with its own enrolled key) a body whose adaptor JSON holds NaN."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedatlas.shared.wire.bundle import SIGNED_PREFIX
from fedatlas.shared.wire.messages import BUNDLE_RECORD, bytes_field
from fedatlas.shared.wire.signing import load_signing_key, sign
from fedatlas.site_client.campaign import train
from fedatlas.site_client.node import NodeSettings
from fedatlas.v1 import coordinator_pb2 as pb

app = ClientApp()


@app.train()
def handle(message: Message, context: Context) -> Message:
    """The honest answer, altered at the hostile sites."""
    honest = train(message, context)
    node = NodeSettings.of(context)
    if node.site_id not in ("h1", "h2"):
        return honest
    bundle = pb.Bundle.FromString(bytes_field(honest.content[BUNDLE_RECORD], "bundle"))
    if node.site_id == "h1":
        bundle.body = bytes([bundle.body[0] ^ 1]) + bundle.body[1:]
    else:
        body = pb.BundleBody.FromString(bundle.body)
        body.adaptor_json = body.adaptor_json.replace('"n_cells":', '"n_cells":NaN,"x":', 1)
        bundle.body = body.SerializeToString(deterministic=True)
        bundle.signature = sign(load_signing_key(node.key), SIGNED_PREFIX + bundle.body)
    altered = ConfigRecord({"bundle": bundle.SerializeToString(), "site-id": node.site_id})
    return Message(RecordDict({BUNDLE_RECORD: altered}), reply_to=message)
