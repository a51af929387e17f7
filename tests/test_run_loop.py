"""The server's round loop against Flower's own in-memory Grid and LinkState (what the simulation
runs on), with nodes registered but no ClientApp behind them: waits are bounded, a node that never
answers is reported, and Ctrl-C's stop event ends a wait at once."""
import secrets
import threading
import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from strategies import run_loop


@pytest.fixture
def grid(monkeypatch):
    """An InMemoryGrid on a fresh in-memory LinkState, set up as Flower's run_simulation does."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=11)
    run.primary_task_id = 12
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[11] = RunRecord(run=run)
    state.task_store[12] = Task(task_id=12, run_id=11)
    for name, value in (("_run_id", 11), ("_task_id", 12), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)
    g = InMemoryGrid(state_factory=factory)
    g.set_run(run)

    def add_node() -> int:
        node_id = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), heartbeat_interval=1e9)
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=1e9)
        return node_id

    g.add_node = add_node
    run_loop.STOP.clear()
    yield g
    run_loop.STOP.clear()


def test_fewer_nodes_than_wanted_goes_on_with_them_after_the_grace(grid):
    nodes = sorted(grid.add_node() for _ in range(2))
    start = time.monotonic()
    assert run_loop.wait_for_nodes(grid, wanted=10, timeout_s=60, grace_s=0.5) == nodes
    assert time.monotonic() - start < 10  # not the 60 s timeout, and never forever


def test_no_node_at_all_ends_the_run_with_a_clear_message(grid):
    with pytest.raises(run_loop.NoNodes, match="round_timeout_s"):
        run_loop.wait_for_nodes(grid, wanted=2, timeout_s=1.0, grace_s=0.2)


def test_a_node_that_never_answers_is_reported_missing_after_the_timeout(grid):
    silent = grid.add_node()
    message = Message(content=RecordDict({"config": ConfigRecord({"phase": "identify"})}), dst_node_id=silent,
                      message_type=MessageType.QUERY)
    start = time.monotonic()
    replies, missing = run_loop.exchange(grid, [message], timeout_s=1.0)
    assert replies == [] and missing == [silent]
    assert 1.0 <= time.monotonic() - start < 10
    assert run_loop.roll_call(grid, [silent], timeout_s=0.5) == {}  # unknown: sampled and logged by node id


def test_the_stop_event_ends_a_wait_at_once(grid):
    silent = grid.add_node()
    message = Message(content=RecordDict({}), dst_node_id=silent, message_type=MessageType.QUERY)
    threading.Timer(0.5, run_loop.STOP.set).start()
    start = time.monotonic()
    with pytest.raises(run_loop.RunInterrupted):
        run_loop.exchange(grid, [message], timeout_s=600)
    assert time.monotonic() - start < 10
