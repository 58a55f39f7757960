"""Incremental Server-Sent Events parsing for relaying upstream streams.

No Django imports. ``SSEParser.feed(bytes)`` returns the events completed by that chunk; a partial
line or event waits in the buffer for the next chunk, so an event split across TCP reads (or a
``\\r\\n`` split between two reads) is parsed exactly once. Comment lines (``: OPENROUTER
PROCESSING``) are kept so the relay can forward them: they are what keeps idle connections alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Event:
    """One SSE event: its raw lines (for forwarding unchanged) and its joined ``data`` field."""

    lines: list[bytes] = field(default_factory=list)
    data: str | None = None  # None for a comment-only event

    @property
    def is_comment(self) -> bool:
        return self.data is None

    @property
    def is_done(self) -> bool:
        return self.data is not None and self.data.strip() == "[DONE]"

    def encode(self) -> bytes:
        return b"\n".join(self.lines) + b"\n\n"


class SSEParser:
    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[bytes] = []
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events: list[Event] = []
        while True:
            line = self._next_line()
            if line is None:
                return events
            event = self._take_line(line)
            if event is not None:
                events.append(event)

    def flush(self) -> list[Event]:
        """At end of stream: whatever is left counts as a final event (a missing blank line)."""
        if self._buffer:
            self._take_line(self._buffer.rstrip(b"\r"))
            self._buffer = b""
        event = self._take_line(b"")
        return [event] if event is not None else []

    def _next_line(self) -> bytes | None:
        buffer = self._buffer
        newline = buffer.find(b"\n")
        carriage = buffer.find(b"\r")
        if carriage == -1 or (newline != -1 and newline < carriage):
            if newline == -1:
                return None
            line, self._buffer = buffer[:newline], buffer[newline + 1 :]
            return line
        # A bare "\r" ends a line too, but a trailing one may be the first half of "\r\n".
        if carriage == len(buffer) - 1:
            return None
        skip = 2 if buffer[carriage + 1 : carriage + 2] == b"\n" else 1
        line, self._buffer = buffer[:carriage], buffer[carriage + skip :]
        return line

    def _take_line(self, line: bytes) -> Event | None:
        if line:
            self._lines.append(line)
            if line.startswith(b"data:"):
                value = line[5:]
                if value.startswith(b" "):
                    value = value[1:]
                self._data.append(value.decode("utf-8", errors="replace"))
            return None
        if not self._lines:
            return None
        event = Event(lines=self._lines, data="\n".join(self._data) if self._data else None)
        self._lines, self._data = [], []
        return event
