"""One channel-layer channel per server process for every ``/ws/events`` socket it holds.

Channels gives each consumer its own layer channel, a task waiting on it, and a group membership
of its own. With thousands of idle sockets in one process that is what broke (bench
``many_sockets.py``): the in-memory layer scans every channel on each ``receive`` (the N-th
handshake costs O(N)), and the Redis layer multiplexes thousands of pending receives and a
``group_add``/``group_discard`` round trip per socket through one connection pool — a Redis
hiccup dropped sockets, a disconnect storm ran the pool out of connections.

Here the process joins a user's group once, with one channel of its own, when the first of that
user's sockets subscribes, and leaves it when the last one goes; one receive loop hands each
message to the local sockets of the group it was sent to (``wallet.events`` names the group in
the message). A socket's inbox is a bounded queue its consumer drains in order, like the layer
channel it replaces. One hub per event loop: the layer's connections belong to a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator

from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

# Messages a socket may have waiting before more are dropped for it — the capacity a layer channel
# of its own had (Channels' default), so a socket that stopped reading cannot grow without bound.
INBOX_CAPACITY = 100
# After a failed receive (Redis unreachable or slow), wait this long, doubling up to the cap,
# before the next; the loop itself never ends while sockets listen.
RETRY_SECONDS, RETRY_CAP_SECONDS = 0.1, 5.0
# Joins and leaves in flight at once. The Redis layer's pool refuses a connection past its size
# (redis-py: 100, MaxConnectionsError, no waiting), and a deploy that drops thousands of sockets
# at once leaves as many groups at once; this keeps the hub's share of that pool small, so the
# rest (the publishers' group_send, this loop's receive) always find a connection.
MEMBERSHIP_CONCURRENCY = 16
# A layer forgets a group membership after its group expiry (channels_redis: a day). A socket of its
# own rejoined whenever one connected; the hub rejoins a group when a socket subscribes to it this
# long after its last join, so a user's new sockets are never left deaf by an old membership.
REJOIN_SECONDS = 3600.0


class Hub:
    def __init__(self, layer) -> None:
        self.layer = layer
        self.channel: str | None = None
        self.members: dict[str, set[asyncio.Queue]] = {}
        self._joined_at: dict[str, float] = {}
        # One lock per group while anyone joins or leaves it: the layer's group_add for the first
        # socket must have returned before a second socket of that user counts itself joined, and
        # the last one's group_discard must not overtake a new first one's group_add.
        self._locks: dict[str, list] = {}
        self._receiver: asyncio.Task | None = None
        self._membership = asyncio.Semaphore(MEMBERSHIP_CONCURRENCY)

    @contextlib.asynccontextmanager
    async def _locked(self, group: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(group, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[group]

    async def subscribe(self, group: str, inbox: asyncio.Queue) -> None:
        """Return once a message sent to ``group`` from now on reaches ``inbox``."""
        if self.channel is None:
            channel = await self.layer.new_channel()
            if self.channel is None:  # another first subscriber may have named one meanwhile
                self.channel = channel
        async with self._locked(group):
            now = time.monotonic()
            if group not in self.members or now - self._joined_at[group] > REJOIN_SECONDS:
                async with self._membership:
                    await self.layer.group_add(group, self.channel)
                self._joined_at[group] = now
                self.members.setdefault(group, set())
            self.members[group].add(inbox)
        if self._receiver is None:
            self._receiver = asyncio.ensure_future(self._receive())

    async def unsubscribe(self, group: str, inbox: asyncio.Queue) -> None:
        async with self._locked(group):
            members = self.members.get(group)
            if members is None or inbox not in members:
                return
            members.discard(inbox)
            if members:
                return
            del self.members[group], self._joined_at[group]
            try:
                async with self._membership:
                    await self.layer.group_discard(group, self.channel)
            except Exception:  # the membership expires in the layer; messages for it are ignored here
                log.warning("could not leave channel-layer group %s", group, exc_info=True)
        if not self.members and self._receiver is not None:
            # Nobody listens: stop receiving, so an idle process (or a test's finished event loop)
            # holds no pending receive. The next subscriber starts it again.
            self._receiver.cancel()
            self._receiver = None

    async def _receive(self) -> None:
        assert self.channel is not None  # subscribe names it before starting this loop
        delay = RETRY_SECONDS
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A socket of its own would have died here and dropped its client; the hub waits
                # and receives again. A message lost meanwhile is covered as before: a client
                # gets a fresh snapshot when it reconnects, a socket re-checks its credential.
                log.warning("channel-layer receive failed; retrying in %.1f s", delay, exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_SECONDS)
                continue
            delay = RETRY_SECONDS
            self.deliver(message)

    def deliver(self, message: dict) -> None:
        group = message.pop("group", None)
        for inbox in tuple(self.members.get(group, ())):
            try:
                inbox.put_nowait(message)
            except asyncio.QueueFull:  # this socket stopped reading; the others still hear it
                log.warning("dropped a %s message for a socket that is not reading", message.get("type"))


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def hub() -> Hub:
    """This event loop's hub on the default channel layer."""
    loop = asyncio.get_running_loop()
    found = _hubs.get(loop)
    if found is None:
        found = _hubs[loop] = Hub(get_channel_layer())
    return found


def new_inbox() -> asyncio.Queue:
    return asyncio.Queue(maxsize=INBOX_CAPACITY)
