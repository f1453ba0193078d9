"""An ASGI app served by uvicorn on a free loopback port, for tests that talk to it over real HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn


@contextlib.contextmanager
def running(app, **options):
    """Serve ``app`` in a background thread (``options``: more ``uvicorn.Config`` settings); yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # log_config=None: uvicorn's dictConfig would close every logging handler of the process, among them
    # absl's (rouge-score imports it), whose close() closes the stream it holds: pytest's capture file.
    options = {"log_config": None, **options}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
