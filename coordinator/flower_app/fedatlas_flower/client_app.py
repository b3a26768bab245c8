"""ClientApp: train this site's adaptor on its own cells and answer with the signed bundle."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedatlas.site_client.campaign import train

app = ClientApp()


@app.train()
def handle(message: Message, context: Context) -> Message:
    """Answer a campaign message."""
    return train(message, context)
