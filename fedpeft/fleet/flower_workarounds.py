"""Workaround for a cost of Flower 1.42's simulation engine that grows with the square of the fleet.

Flower bug (flwr 1.42, flwr/server/superlink/fleet/vce/vce_api.py `add_messages_to_queue`): every
0.1 s the engine asks the in-memory LinkState for each virtual node's next message in turn, and
each ask (`InMemoryLinkState.get_message_ins`) walks every stored message, expiry- and
federation-checking each one, under the state's lock and the GIL. That is nodes x stored messages
checks per cycle: 1000 nodes with a 1000-query roll call in flight is a million checks a cycle,
and even 50 sampled messages cost 50,000 checks every 0.1 s for as long as the run lasts, taken
from the server and the clients' result handling.

`apply()` swaps that loop for one that makes a single pass over the stored messages per cycle and
delivers each undelivered one addressed to a simulated node, with the same checks and the same
delivered-at mark `get_message_ins` applies. A state that is not the in-memory one keeps Flower's loop.
"""
from __future__ import annotations

import threading
from queue import Queue

_ORIGINAL = None


def deliver_pending(state, queue: Queue, nodes: set[int]) -> int:
    """One pass: queue the first undelivered message of each node in `nodes`, marked delivered. Returns how many."""
    from flwr.supercore.date import now

    delivered, served = [], set()
    with state.lock:
        for msg_id in list(state.message_ins_store):
            message = state.message_ins_store.get(msg_id)
            node = None if message is None else message.metadata.dst_node_id
            if node not in nodes or node in served or message.metadata.delivered_at != "":
                continue
            state._check_stored_messages({msg_id})  # expired or outside the federation: deleted, as Flower does
            if state.message_ins_store.get(msg_id) is message:
                delivered.append(message)
                served.add(node)  # one message per node per pass, as Flower's limit=1
        stamp = now().isoformat()
        for message in delivered:
            message.metadata.delivered_at = stamp
    for message in delivered:
        queue.put(message)
    return len(delivered)


def _add_messages_to_queue(state, queue: Queue, nodes_mapping: dict, f_stop: threading.Event) -> None:
    if not all(hasattr(state, name) for name in ("message_ins_store", "lock", "_check_stored_messages")):
        return _ORIGINAL(state, queue, nodes_mapping, f_stop)
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        deliver_pending(state, queue, nodes)
        f_stop.wait(0.1)
    return None


def apply() -> None:
    """Install the single-pass delivery loop in Flower's simulation engine (idempotent)."""
    global _ORIGINAL
    from flwr.server.superlink.fleet.vce import vce_api

    if vce_api.add_messages_to_queue is not _add_messages_to_queue:
        _ORIGINAL = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = _add_messages_to_queue
