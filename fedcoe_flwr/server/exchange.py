"""Send messages and wait for their replies, surviving a SuperNode that restarts mid-round.

Flower marks a message delivered once a SuperNode pulls it. A SuperNode stopped after that
(an operator's restart, a container update) takes the message with it: it comes back under
the same node id (node auth keys it by its public key) and asks for new messages, and the
server would wait out ``round_timeout`` for a reply that never comes (or, once the node is
back, get ``Message Unavailable`` for it). Here a message whose node re-activated while the
message was unanswered is sent again, also one already answered by an error (``Node
Unavailable`` while the node was away). A node that went away during the exchange (online when
it began) is waited for up to ``restart_grace`` seconds after its error, since a restart takes
longer than the other sites' training on a loaded host; a node already away when the exchange
began costs no extra wait: its error stands once nothing else is outstanding.

A message sent again carries the same content, so a node that got both (it restarted before
pulling the first) trains the same round twice from the same private-state version (the
message's ``server_round`` picks it); only the first reply is kept."""

from __future__ import annotations

import time
from logging import WARNING
from typing import Iterable, Protocol

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

POLL_S = 3.0  # Flower's own pull interval in a deployment
MAX_RESENDS = 3  # per message: a node that keeps restarting is not chased forever


def activations(grid: Grid) -> dict[int, str]:
    """Online node id -> when Flower last activated it ('' where the grid does not say)."""
    return {int(n.node_id): str(n.last_activated_at) for n in grid.get_nodes()}


def resent_copy(message: Message) -> Message:
    meta = message.metadata
    return Message(content=message.content, dst_node_id=meta.dst_node_id, message_type=meta.message_type,
                   group_id=meta.group_id, ttl=meta.ttl)


def reaches_simulated_nodes(grid: Grid) -> bool:
    """Simulated nodes never restart, and a grid without pull/push (a test's in-process grid)
    has no messages in flight: Flower's exchange serves both."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid) or not hasattr(grid, "pull_messages")


class Deadlines(Protocol):
    """What an exchange waits for (the run section of a config has both)."""

    round_timeout: float
    node_restart_grace: float


def exchange(grid: Grid, messages: Iterable[Message], deadlines: Deadlines) -> list[Message]:
    """``send_and_receive`` with a run's ``round_timeout`` and ``node_restart_grace``."""
    return send_and_receive(grid, messages, deadlines.round_timeout, deadlines.node_restart_grace)


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float, restart_grace: float = 0.0,
                     poll_s: float = POLL_S) -> list[Message]:
    """``grid.send_and_receive`` that sends again a message lost to a restarted node (module
    docstring). Each reply's ``reply_to_message_id`` names the message as the caller built it,
    also when the reply answers a copy sent again."""
    messages = list(messages)
    if not messages or reaches_simulated_nodes(grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    seen = activations(grid)  # before the push: an activation after it is a restart
    seen_at_push = set(seen)
    deadline = time.time() + timeout
    by_id: dict[str, Message] = {}
    pending: dict[str, str] = {}  # id pushed (the message or a copy), not yet answered -> caller's message id
    for message, pushed in zip(messages, grid.push_messages(messages)):
        if pushed:
            pending[pushed] = pushed
            by_id[pushed] = message
    resends: dict[str, int] = {}
    replies: dict[str, Message] = {}
    errors: dict[str, Message] = {}  # the latest error per message, kept in case its node comes back
    left_at: dict[str, float] = {}  # message whose node was online at the push and went away -> when
    while True:
        # the message and every copy: a node that restarted before pulling answers the first
        for reply in grid.pull_messages(list(pending)) if pending else []:
            mid = pending.pop(reply.metadata.reply_to_message_id, None)
            if mid is None or mid in replies:
                continue
            reply.metadata.__dict__["_reply_to_message_id"] = mid  # as Flower's own grid sets it
            # an error for one copy (the lost original answers `Message Unavailable` once its
            # node re-activates) is final only when no other copy is out
            (errors if reply.has_error() else replies)[mid] = reply
            if (reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
                    and by_id[mid].metadata.dst_node_id in seen_at_push):
                left_at[mid] = time.time()
        waiting = {mid for mid in pending.values() if mid not in replies}
        may_come_back = {mid for mid, t in left_at.items() if mid not in replies
                         and resends.get(mid, 0) < MAX_RESENDS and time.time() < t + restart_grace}
        if not (waiting or may_come_back) or time.time() >= deadline:
            break
        now = activations(grid)
        again = [mid for mid in by_id if mid not in replies and resends.get(mid, 0) < MAX_RESENDS
                 and (node := by_id[mid].metadata.dst_node_id) in now and now[node] and now[node] != seen.get(node)]
        if again:
            copies = [resent_copy(by_id[mid]) for mid in again]
            for mid, pushed in zip(again, grid.push_messages(copies)):
                if not pushed:
                    continue
                node = by_id[mid].metadata.dst_node_id
                log(WARNING, "[exchange] node %d came back (activated %s) while its %r message was unanswered; "
                    "sent it again", node, now[node], by_id[mid].metadata.message_type)
                pending[pushed] = mid
                resends[mid] = resends.get(mid, 0) + 1
        seen.update(now)
        time.sleep(max(0.0, min(poll_s, deadline - time.time())))
    return list(replies.values()) + [r for mid, r in errors.items() if mid not in replies]
