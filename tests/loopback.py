"""An ASGI app served by uvicorn on a free loopback port, for tests that talk to it over real HTTP."""

from lmcycle.feedback.simulate import serving as running  # noqa: F401  (the library's own, shared by the tests)
