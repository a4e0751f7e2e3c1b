"""A free TCP port on 127.0.0.1 for a test's server, or one where nothing listens."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port that was free a moment ago: bound, then closed, so nothing listens there (connections are
    refused) until a test starts a server on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
