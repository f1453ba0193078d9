"""An ASGI app served by uvicorn on a free loopback port, for tests that talk to it over real HTTP."""

from lmcycle.feedback.simulate import serving


def running(app, **options):
    """:func:`lmcycle.feedback.simulate.serving` for tests; yields the URL.

    The server keeps idle connections for 300 s, not uvicorn's 5: httpx (the openai client's transport) drops
    its own idle connections after 5 s, and with both at 5 a test that reuses a connection at that moment
    races the server's close and gets "connection reset" (seen once in CI under load)."""
    return serving(app, **{"timeout_keep_alive": 300, **options})
