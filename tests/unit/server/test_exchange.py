"""The exchange sends again a message lost to a SuperNode that restarted mid-round, keeps
one reply per message, waits a bounded grace for a node that went away mid-round, and ends as
soon as only nodes already away at the start are left."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo

from fedcoe_flwr.server.exchange import send_and_receive


class FakeLink:
    """A SuperLink seen from the ServerApp, one tick per poll. ``plans``: node id -> what the
    node does with each message it gets, in order: ('answer', ticks), ('lose', restart tick: from
    then on the message is answered `Message Unavailable`), ('away', back tick or None: the node
    is offline from the start), ('leave', (tick it goes offline, back tick or None): it pulled
    the message and stops, as a SIGTERM'd SuperNode deactivates) or ('late', ticks: it answers
    the first message only after a restart at tick 1, before pulling it)."""

    def __init__(self, plans: dict[int, list[tuple[str, object]]]):
        self.plans = {n: list(p) for n, p in plans.items()}
        self.activated = {n: "t0" for n, p in plans.items() if not (p and p[0][0] == "away")}
        self.tick = 0
        self.pushed: list[Message] = []
        self.due: dict[str, tuple[int, Message]] = {}  # message id -> (tick of its reply, reply)
        self.events: list[tuple[int, int, str]] = []  # (tick, node, new activation)
        self.lost: dict[str, int] = {}  # message id -> tick its node restarted

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.pushed.append(msg)
            node = msg.metadata.dst_node_id
            action, arg = self.plans[node].pop(0) if self.plans[node] else ("answer", 1)
            if action == "answer":
                self.due[msg.metadata.message_id] = (self.tick + arg, reply_to(msg))
            elif action == "late":
                self.events.append((1, node, "t-late"))
                self.due[msg.metadata.message_id] = (self.tick + arg, reply_to(msg))
            elif action == "lose":  # pulled, then the node restarts: never answered
                self.events.append((arg, node, f"t{arg}"))
                self.lost[msg.metadata.message_id] = arg
            elif action == "away" and arg is not None:
                self.events.append((arg, node, f"t{arg}"))
            elif action == "leave":
                gone, back = arg
                self.events.append((gone, node, ""))
                if back is not None:
                    self.events.append((back, node, f"t{back}"))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in message_ids:
            msg = next(m for m in self.pushed if m.metadata.message_id == mid)
            if msg.metadata.dst_node_id not in self.activated:
                out.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=msg))
            elif mid in self.lost and self.lost[mid] <= self.tick:  # as Flower 1.39 answers it then
                out.append(Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="Message Unavailable"),
                                   reply_to=msg))
                del self.lost[mid]
            elif mid in self.due and self.due[mid][0] <= self.tick:
                out.append(self.due.pop(mid)[1])
        return out

    def get_nodes(self):  # once per poll, also when no message is out
        self.tick += 1
        for tick, node, stamp in sorted(e for e in self.events if e[0] <= self.tick):
            if stamp:
                self.activated[node] = stamp
            else:
                self.activated.pop(node, None)
            self.events.remove((tick, node, stamp))
        return [NodeInfo(node_id=n, last_activated_at=a) for n, a in self.activated.items()]

    def send_and_receive(self, messages, timeout=None):
        raise AssertionError("a deployment's exchange must not fall back to Flower's")


def reply_to(msg: Message) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"node": msg.metadata.dst_node_id})}), reply_to=msg)


def train_messages(nodes: list[int]) -> list[Message]:
    return [Message(content=RecordDict({"config": ConfigRecord({"server_round": 2})}), dst_node_id=n,
                    message_type="train") for n in nodes]


def exchange(link: FakeLink, nodes: list[int], timeout: float = 30.0, restart_grace: float = 0.0):
    msgs = train_messages(nodes)
    t0 = time.time()
    replies = send_and_receive(link, msgs, timeout, restart_grace, poll_s=0.0)
    ids = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    return {ids[r.metadata.reply_to_message_id]: r for r in replies}, replies, time.time() - t0


def test_a_message_lost_to_a_restart_is_sent_again_and_its_reply_names_the_original():
    link = FakeLink({1: [("answer", 2)], 2: [("lose", 3), ("answer", 1)], 3: [("answer", 6)]})
    by_node, replies, _ = exchange(link, [1, 2, 3])
    assert sorted(by_node) == [1, 2, 3] and len(replies) == 3
    assert not any(r.has_error() for r in replies)
    resent = [m for m in link.pushed if m.metadata.dst_node_id == 2]
    assert len(resent) == 2 and resent[0].metadata.message_id != resent[1].metadata.message_id
    assert resent[1].content is resent[0].content  # the same payload, not rebuilt


def test_a_node_away_from_the_start_costs_no_wait_once_the_others_answered():
    link = FakeLink({1: [("answer", 2)], 2: [("away", None)]})
    by_node, _, elapsed = exchange(link, [1, 2], timeout=600.0, restart_grace=600.0)
    assert not by_node[1].has_error()
    assert by_node[2].has_error() and by_node[2].error.code == ErrorCode.NODE_UNAVAILABLE
    assert elapsed < 5 and len(link.pushed) == 2  # nothing sent again to a node that never came back


def test_an_unavailable_node_that_comes_back_while_others_train_gets_the_message_again():
    link = FakeLink({1: [("answer", 8)], 2: [("away", 3), ("answer", 1)]})
    by_node, _, _ = exchange(link, [1, 2])
    assert not by_node[1].has_error() and not by_node[2].has_error()
    assert len([m for m in link.pushed if m.metadata.dst_node_id == 2]) == 2


def test_a_node_stopped_mid_round_that_comes_back_after_the_others_answered_is_waited_for():
    # site 1 answers at once; site 2 pulled, was stopped (Node Unavailable from tick 2) and is
    # back only at tick 40: within the grace its message is sent again and answered
    link = FakeLink({1: [("answer", 1)], 2: [("leave", (2, 40)), ("answer", 1)]})
    by_node, replies, _ = exchange(link, [1, 2], restart_grace=30.0)
    assert not by_node[1].has_error() and not by_node[2].has_error() and len(replies) == 2
    assert len([m for m in link.pushed if m.metadata.dst_node_id == 2]) == 2


def test_a_node_stopped_mid_round_that_stays_away_costs_the_grace_and_no_more():
    link = FakeLink({1: [("answer", 1)], 2: [("leave", (2, None))]})
    by_node, _, elapsed = exchange(link, [1, 2], timeout=600.0, restart_grace=0.5)
    assert by_node[2].has_error() and by_node[2].error.code == ErrorCode.NODE_UNAVAILABLE
    assert 0.5 <= elapsed < 5 and len(link.pushed) == 2
    without_grace = FakeLink({1: [("answer", 1)], 2: [("leave", (2, None))]})
    assert exchange(without_grace, [1, 2], timeout=600.0)[2] < 0.5  # 0 s grace: the error stands at once


def test_a_node_that_restarted_before_pulling_answers_once():
    link = FakeLink({1: [("answer", 5)], 2: [("late", 3), ("answer", 4)]})
    by_node, replies, _ = exchange(link, [1, 2])
    assert sorted(by_node) == [1, 2] and len(replies) == 2  # the copy's later reply is not a second one


def test_the_timeout_still_bounds_a_silent_node():
    link = FakeLink({1: [("answer", 1)], 2: [("answer", 10**9)]})
    by_node, _, elapsed = exchange(link, [1, 2], timeout=0.5)
    assert list(by_node) == [1] and elapsed < 5
