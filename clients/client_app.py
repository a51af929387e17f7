"""The Flower ClientApp. `app` reads the run config from Flower's context (`flwr run .`);
`make_client_app(cfg)` binds a config directly (the in-process simulation)."""
from __future__ import annotations

import fedpeft  # noqa: F401  (torchvision shim first)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import logging

from clients.local_update import client_round
from fedpeft.fleet.config import RunConfig


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = cfg or RunConfig.from_mapping(context.run_config)
        server_round = int(msg.content["config"]["server-round"])
        arrays = msg.content.array_records.get("arrays", ArrayRecord())
        reply = client_round(config, dict(context.node_config), arrays, server_round)
        logging.getLogger("fedpeft").info("client %s (%s) round %d: %s %s", reply.metrics["client_id"],
                                          reply.info["device"], server_round, reply.info["status"], reply.info["chosen"])
        content = RecordDict({
            "arrays": reply.arrays,
            "metrics": MetricRecord({k: float(v) if isinstance(v, float) else int(v) for k, v in reply.metrics.items()}),
            "info": ConfigRecord(reply.info),
        })
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
