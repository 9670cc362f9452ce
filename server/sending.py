"""What waits on a client's reading is bounded: how long a stream may take to send, and the bytes of
unary responses a connection has not read.

A client that opens calls and never reads them (HTTP/2 flow-control window 0) keeps each response
in the server's memory until the connection closes. Admission does not count such calls (they are
not at work), so without these bounds a few connections could grow the server without limit:
- a stream still sending `stall_seconds` after its first item is cancelled (`StallTimer`); its
  last message stays with the transport until the connection closes, at its maximum age
  (`--max-connection-age-seconds` plus the grace), when it is freed;
- a unary response (RecommendBatch: up to ~3 MB) is held against its connection's budget and the
  server's (`UnsentBytes`) from the moment it is built until it is sent or the connection closes.
"""
from __future__ import annotations

import asyncio

from recsys.server.errors import Overloaded

# Unary responses not yet read, per connection and in all: a client that reads nothing can hold
# this much of the server's memory, for at most the connection's maximum age.
UNSENT_BYTES_PER_CONNECTION = 32 * 1024 * 1024
UNSENT_BYTES = 512 * 1024 * 1024


class StallTimer:
    """Cancels the running task (a streaming call) if it is still sending after `seconds`.

    grpc.aio cannot take back a write its transport has not sent: cancelling the task is what
    gRPC itself does when a client cancels (the call ends, its frames and work are released, and
    the pending message goes when the connection does). A pending write cannot be followed by a
    status either, so the stream ends without one."""

    def __init__(self, seconds: float):
        self.fired = False
        self._task = asyncio.current_task()
        self._handle = asyncio.get_running_loop().call_later(seconds, self._fire)

    def _fire(self) -> None:
        self.fired = True
        self._task.cancel()

    def cancel(self) -> None:
        self._handle.cancel()


class UnsentBytes:
    """Bytes of responses built but not yet read, per connection (the call's peer) and in all.
    Runs on the event loop only: no lock."""

    def __init__(self, per_connection: int = UNSENT_BYTES_PER_CONNECTION, total: int = UNSENT_BYTES):
        self.per_connection = per_connection
        self.limit = total
        self.total = 0
        self._by_peer: dict[str, int] = {}

    def hold(self, context, size: int) -> None:
        """Count `size` bytes against the call's connection until the call is done (sent, failed or
        cancelled); Overloaded if either budget would be exceeded."""
        peer = context.peer()
        held = self._by_peer.get(peer, 0)
        if held + size > self.per_connection:
            raise Overloaded(f"this connection has {held:,} bytes of responses it has not read; the limit is "
                             f"{self.per_connection:,}: read them, or retry later")
        if self.total + size > self.limit:
            raise Overloaded("the server holds its limit of responses clients have not read; retry later")
        self._by_peer[peer] = held + size
        self.total += size
        context.add_done_callback(lambda _: self._release(peer, size))

    def _release(self, peer: str, size: int) -> None:
        self.total -= size
        left = self._by_peer[peer] - size
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]
