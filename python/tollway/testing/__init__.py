"""Test helpers that ship with tollway: a simulated OpenAI-compatible upstream.

``FakeUpstream`` is imported lazily so that ``python -m tollway.testing.upstream``
does not find its own module already imported by the package (runpy warns then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tollway.testing.upstream import FakeUpstream, Fault, RecordedRequest

__all__ = ["FakeUpstream", "Fault", "RecordedRequest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tollway.testing import upstream

        return getattr(upstream, name)
    raise AttributeError(f"module 'tollway.testing' has no attribute {name!r}")
