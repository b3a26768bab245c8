"""ClientApp: a site's answers to campaigns and federated builds, from its own cells."""

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedatlas.site_client import federated_build
from fedatlas.site_client.campaign import train

app = ClientApp()


@app.train()
def handle(message: Message, context: Context) -> Message:
    """Answer a ``train`` message: a stage of a federated build's secure round (SecAgg+, through
    Flower's ``secaggplus_mod``, whose stages are all plain ``train`` messages), else a
    campaign's: the signed bundle of this site's adaptor."""
    if federated_build.is_secure_round(message):
        return secaggplus_mod(message, context, federated_build.secure_round)
    return train(message, context)


@app.query("genes")
def genes(message: Message, context: Context) -> Message:
    """Federated build: this site's gene names."""
    return federated_build.genes(message, context)


@app.query("votes")
def votes(message: Message, context: Context) -> Message:
    """Federated build: this site's per-batch gene votes."""
    return federated_build.votes(message, context)


@app.query("cells")
def cells(message: Message, context: Context) -> Message:
    """Federated build with secure aggregation: this site's number of cells."""
    return federated_build.cells(message, context)


@app.train("round")
def train_round(message: Message, context: Context) -> Message:
    """Federated build: one round of local training; the trunk goes back."""
    return federated_build.train_round(message, context)


@app.train("finish")
def finish(message: Message, context: Context) -> Message:
    """Federated build: this site's signed adaptor on the federated release."""
    return federated_build.finish(message, context)
