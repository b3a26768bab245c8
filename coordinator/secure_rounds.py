"""One round of a federated build under secure aggregation: Flower's ``SecAggPlusWorkflow``.

The workflow is Flower 1.41's own, driven through its legacy ``Strategy`` interface (the only
one it accepts): :class:`_RoundStrategy` hands it the round's instructions per node and keeps
what it unmasks. The workflow sends four ``train`` messages to each site (SecAgg+ stages
``setup``, ``share_keys``, ``collect_masked_vectors``, ``unmask``; the third carries the trunk
and round settings, and its answer the masked vector), and hands the strategy only the unmasked
weighted mean of the sites' vectors, with each site's plain answers (its weight, site id and
loss). What a site masks and how the mean becomes the next trunk:
:mod:`fedatlas.shared.model.secure_aggregation`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedatlas.shared.model.secure_aggregation import RECONSTRUCTION_THRESHOLD
from fedatlas.shared.wire.messages import TENSORS


@dataclass
class SecureRound:
    """What the coordinator learns from one SecAgg+ round.

    Attributes:
        mean: the unmasked mean of the sites' vectors, weighted by their weights (None when
            the protocol halted: too few sites answered a stage).
        weights: per node whose vector went in, the weight it claimed (its capped cells).
        answers: per such node, its plain answers (``site-id``, ``loss``).
        failures: the errors of nodes that failed a stage.
    """

    mean: list[np.ndarray] | None = None
    weights: dict[int, int] = field(default_factory=dict)
    answers: dict[int, dict[str, Scalar]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


class _RoundStrategy(Strategy):
    """The strategy ``SecAggPlusWorkflow`` asks for a round's instructions and gives the
    unmasked mean to (every result's parameters are that mean)."""

    def __init__(self, grid: Grid, instructions: Mapping[int, FitIns]) -> None:
        self.grid, self.instructions = grid, instructions
        self.outcome = SecureRound()

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Nothing: the trunk travels in the instructions."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Every node of the round with its instructions."""
        run_id = self.grid.run.run_id
        return [
            (GridClientProxy(n, self.grid, run_id), ins) for n, ins in self.instructions.items()
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the unmasked mean and the sites' plain answers; the workflow stores nothing."""
        outcome = self.outcome
        for proxy, result in results:
            outcome.weights[proxy.node_id] = result.num_examples
            outcome.answers[proxy.node_id] = dict(result.metrics)
        if results:
            outcome.mean = parameters_to_ndarrays(results[0][1].parameters)
        outcome.failures = [str(f) for f in failures]
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """No evaluation round."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """No evaluation round."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No central evaluation."""
        return None


def round_instructions(
    plan_json: str, genes: list[str], round_index: int, trunk: bytes, clip: float
) -> FitIns:
    """What every site gets in the ``collect_masked_vectors`` stage: the plan, the genes (JSON),
    the round, the trunk (:func:`~fedatlas.shared.wire.codec.encode_tensors` bytes) and the
    round's clip bound."""
    config: dict[str, Scalar] = {
        "plan": plan_json, "genes": json.dumps(genes), "round": round_index, TENSORS: trunk,
        "clip": clip,
    }  # fmt: skip
    return FitIns(Parameters(tensors=[], tensor_type=""), config)


def run_secure_round(
    grid: Grid,
    instructions: Mapping[int, FitIns],
    *,
    round_number: int,
    clip: float,
    max_weight: int,
    timeout: float,
) -> SecureRound:
    """Run SecAgg+ over the nodes of ``instructions`` (each site shares its keys with all the
    others; its masks can be removed with ``RECONSTRUCTION_THRESHOLD`` of its shares, so a
    site may drop out mid-round). ``clip`` bounds every coordinate of a vector (Flower's
    quantisation range), ``max_weight`` the sites' weights."""
    strategy = _RoundStrategy(grid, instructions)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: round_number}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={})
    workflow = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
        max_weight=float(max_weight), clipping_range=clip, timeout=timeout,
    )  # fmt: skip
    workflow(grid, LegacyContext(base, strategy=strategy))
    return strategy.outcome
