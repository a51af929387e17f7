"""The server's round loop, in place of Flower's `Strategy.start` (which always counts rounds from 1,
waits forever for nodes and replies, and cannot be stopped from outside):

- a roll call before the first round asks every node who it is (client id, device), so rounds
  sample by client id and a node that dies is logged with its client and device;
- a round waits at most `round_timeout_s` for nodes to connect and for replies, then goes on with
  what it has (a node that did not answer is logged `failed`), or ends the run with a clear message
  when no node is there at all;
- `STOP` (set on Ctrl-C by the simulation driver) ends the loop between two polls;
- after every round (round 0 included) the caller's `end_round` writes the round's line and an
  atomic checkpoint, so a run killed at any moment resumes from its last complete round.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

STOP = threading.Event()
POLL_S = 0.1
NODE_GRACE_S = 15.0  # fewer nodes than asked for, none new for this long: go on with those


class RunInterrupted(Exception):
    """The run was stopped from outside (Ctrl-C); everything logged so far is kept."""


class NoNodes(RuntimeError):
    """No node connected within round_timeout_s."""


def _check_stop() -> None:
    if STOP.is_set():
        raise RunInterrupted("interrupted")


def wait_for_nodes(grid: Grid, wanted: int, timeout_s: float, grace_s: float = NODE_GRACE_S) -> list[int]:
    """The connected nodes once `wanted` are there; fewer if none joined for `grace_s` (or
    `timeout_s` ran out) while at least one is. Raises NoNodes when none connected in `timeout_s`."""
    start = last_change = time.monotonic()
    nodes: list[int] = []
    while True:
        _check_stop()
        current = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(current) != len(nodes):
            nodes, last_change = current, now
        if len(nodes) >= wanted:
            return nodes
        if nodes and (now - last_change >= grace_s or now - start >= timeout_s):
            print(f"only {len(nodes)} of {wanted} nodes connected; going on with them", file=sys.stderr)
            return nodes
        if now - start >= timeout_s:
            raise NoNodes(f"no node connected within {timeout_s:g} s (round_timeout_s); is a SuperNode running?")
        time.sleep(POLL_S * 5)


def exchange(grid: Grid, messages: Iterable[Message], timeout_s: float,
             on_reply: Callable[[Message], None] | None = None) -> tuple[list[Message], list[int]]:
    """Send `messages` and collect replies until all are in or `timeout_s` passes: (replies, nodes
    that did not answer). Raises RunInterrupted when STOP is set."""
    messages = list(messages)
    destination = {}
    for msg_id, msg in zip(grid.push_messages(messages), messages):
        destination[msg_id] = msg.metadata.dst_node_id
    pending, replies = set(destination), []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        _check_stop()
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
        if pending:
            time.sleep(POLL_S)
    return replies, sorted(destination[m] for m in pending)


def roll_call(grid: Grid, nodes: Iterable[int], timeout_s: float) -> dict[int, dict]:
    """{node id: {"client_id", "device"}} of every node that answered the identify query."""
    config = ConfigRecord({"server-round": 0, "phase": "identify"})
    messages = [Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n)
                for n in nodes]
    replies, _ = exchange(grid, messages, timeout_s)
    known = {}
    for reply in replies:
        try:
            if not reply.has_error():
                known[int(reply.metadata.src_node_id)] = {"client_id": int(reply.content["metrics"]["client_id"]),
                                                          "device": str(reply.content["info"]["device"])}
        except (KeyError, TypeError, ValueError):
            pass  # a node that cannot say who it is stays unknown: sampled by node id, logged by node id
    return known


def run_rounds(grid: Grid, strategy, first_round: int, arrays: ArrayRecord,
               end_round: Callable[[int], None],
               on_reply: Callable[[Message], None] | None = None,
               phase: Callable[[str], AbstractContextManager] = lambda name: nullcontext()) -> ArrayRecord:
    """Rounds `first_round`..cfg.rounds: sample, send, collect, aggregate, then `end_round(round)`
    (evaluation, logs, checkpoint). `phase(name)` times each step (strategies/run_timings.py).
    Returns the final global adapter record."""
    cfg = strategy.cfg
    for server_round in range(first_round, cfg.rounds + 1):
        with phase("configure"):
            wait_for_nodes(grid, cfg.sample_size, cfg.round_timeout_s)
            messages = strategy.configure_train(server_round, arrays, ConfigRecord({}), grid)
        with phase("exchange"):
            replies, missing = exchange(grid, messages, cfg.round_timeout_s, on_reply)
        with phase("aggregate"):
            new_arrays, _ = strategy.aggregate_train(server_round, replies, missing)
        if new_arrays is not None:
            arrays = new_arrays
        end_round(server_round)
    return arrays
