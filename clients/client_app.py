"""The Flower ClientApp. `app` reads the run config from Flower's context (`flwr run .`);
`make_client_app(cfg)` binds a config directly (the in-process simulation).

`train` runs one budgeted round; `query` answers the shared-mask TaskEdge calibration request that
comes once before round 1."""
from __future__ import annotations

import logging

import fedpeft  # noqa: F401  (torchvision shim first)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.local_update import ClientReply, Conditions, calibration_round, client_round, crash_if_injected, identify
from fedpeft.fleet.config import RunConfig


def _reply_message(msg: Message, reply: ClientReply, server_round: int) -> Message:
    if "status" in reply.info:
        logging.getLogger("fedpeft").info("client %s (%s) round %d: %s %s", reply.metrics["client_id"],
                                          reply.info["device"], server_round, reply.info["status"], reply.info["chosen"])
    content = RecordDict({
        "arrays": reply.arrays,
        "metrics": MetricRecord({k: float(v) if isinstance(v, float) else int(v) for k, v in reply.metrics.items()}),
        "info": ConfigRecord(reply.info),
    })
    return Message(content=content, reply_to=msg)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = cfg or RunConfig.from_mapping(context.run_config)
        server_round = int(msg.content["config"]["server-round"])
        arrays = msg.content.array_records.get("arrays", ArrayRecord())
        conditions = Conditions.from_config(msg.content["config"])
        reply = client_round(config, dict(context.node_config), arrays, server_round, conditions)
        crash_if_injected(config, dict(context.node_config))
        return _reply_message(msg, reply, server_round)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        config = cfg or RunConfig.from_mapping(context.run_config)
        if msg.content["config"].get("phase") == "identify":
            return _reply_message(msg, identify(config, dict(context.node_config)), 0)
        return _reply_message(msg, calibration_round(config, dict(context.node_config)), 0)

    return app


app = make_client_app()
