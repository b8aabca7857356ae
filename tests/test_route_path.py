"""tollway.asgi.route_path, the path auth and the fast path decide on, is the path
Starlette's router serves for every scope: a mount prefix cannot make auth see a public
path where the router serves another (or the reverse)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from starlette._utils import get_route_path

from tollway.asgi import route_path

PATHS = st.text(alphabet="/svcapiheltd.", max_size=24)


@given(path=PATHS, root=PATHS)
def test_route_path_is_starlettes(path: str, root: str) -> None:
    scope = {"path": path, "root_path": root}
    assert route_path(scope) == get_route_path(scope)


def test_examples() -> None:
    assert route_path({"path": "/svc/api/ai/health", "root_path": "/svc"}) == "/api/ai/health"
    assert route_path({"path": "/svcx/api", "root_path": "/svc"}) == "/svcx/api"
    assert route_path({"path": "/api/ai/health", "root_path": "/svc"}) == "/api/ai/health"
    assert route_path({"path": "/api/ai/health"}) == "/api/ai/health"
