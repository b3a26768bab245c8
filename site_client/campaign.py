"""The site side of a Flower adaptor campaign (runs inside the site's ClientApp).

The composite arrives signed; the site checks it against the coordinator key it trusts, maps
its own cells with its node's settings (:class:`~fedatlas.site_client.node.NodeSettings`; large
files in chunks, in bounded memory) and answers with its signed bundle only.
"""

from __future__ import annotations

from flwr.app import Context, Message

from fedatlas.site_client.node import NodeSettings


def train(message: Message, context: Context) -> Message:
    """Handle a campaign message: map the site's cells, reply with its signed bundle."""
    node = NodeSettings.of(context)
    return node.bundle_reply(message, node.accept_composite(message))
