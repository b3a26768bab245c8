"""fedatlas' ClientApp for federated builds, except at the site named by the run setting
``attacker``: there each round's answer is replaced by an all-zero trunk claiming 10^9 cells."""

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedatlas.flower_app.fedatlas_flower import client_app as fedatlas_app
from fedatlas.shared.wire.codec import decode_tensors, encode_tensors
from fedatlas.shared.wire.messages import FEDERATED_RECORD, TENSORS, TRUNK_RECORD, bytes_field

CLAIMED_CELLS = 10**9


def zero_trunk(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The honest answer to a round, altered at the attacker: zeros for every tensor of the
    trunk and a claim of 10^9 cells."""
    honest = call_next(message, context)
    answer = honest.content[FEDERATED_RECORD]
    if answer["site-id"] != context.run_config["attacker"]:
        return honest
    trunk = decode_tensors(bytes_field(honest.content[TRUNK_RECORD], TENSORS), source="trunk")
    zeros = encode_tensors({name: torch.zeros_like(tensor) for name, tensor in trunk.items()})
    altered = ConfigRecord(
        {"site-id": answer["site-id"], "n-cells": CLAIMED_CELLS, "loss": answer["loss"]}
    )
    content = RecordDict({FEDERATED_RECORD: altered, TRUNK_RECORD: ConfigRecord({TENSORS: zeros})})
    return Message(content, reply_to=message)


app = ClientApp()
app.query("genes")(fedatlas_app.genes)
app.query("votes")(fedatlas_app.votes)
app.train("round", mods=[zero_trunk])(fedatlas_app.train_round)
app.train("finish")(fedatlas_app.finish)
