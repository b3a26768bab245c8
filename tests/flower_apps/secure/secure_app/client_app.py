"""fedatlas' own ClientApp, except that in a secure round each site also keeps what it hands
to SecAgg+ before masking: the trunk it was sent (``SITE-ROUND.sent``) and its unmasked answer
(``SITE-ROUND.reply.pb``, Flower's protobuf bytes), in ``REPORT.sites/``."""

from pathlib import Path

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common.recorddict_compat import recorddict_to_fitins

from fedatlas.flower_app.fedatlas_flower import client_app as fedatlas_app
from fedatlas.shared.wire.messages import TENSORS
from fedatlas.site_client import federated_build
from fedatlas.site_client.node import NodeSettings


def kept_round(message: Message, context: Context) -> Message:
    """The site's unmasked answer to a secure round, also written to ``REPORT.sites/``."""
    reply = federated_build.secure_round(message, context)
    config = recorddict_to_fitins(message.content, keep_input=True).config
    folder = Path(str(context.run_config["report"]) + ".sites")
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{NodeSettings.of(context).site_id}-{config['round']}"
    (folder / f"{name}.sent").write_bytes(bytes(config[TENSORS]))  # type: ignore[arg-type]
    proto = recorddict_to_proto(reply.content).SerializeToString()
    (folder / f"{name}.reply.pb").write_bytes(proto)
    return reply


app = ClientApp()


@app.train()
def handle(message: Message, context: Context) -> Message:
    """A secure round's stage (recorded at the site), else fedatlas' own answer."""
    if federated_build.is_secure_round(message):
        return secaggplus_mod(message, context, kept_round)
    return fedatlas_app.handle(message, context)


app.query("genes")(fedatlas_app.genes)
app.query("votes")(fedatlas_app.votes)
app.query("cells")(fedatlas_app.cells)
app.train("round")(fedatlas_app.train_round)
app.train("finish")(fedatlas_app.finish)
