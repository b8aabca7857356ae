"""The ``ShadowCompared`` event: one per shadow call, on ``tollway.shadow.compared.<tenant>``.

The struct is part of the event contract, so it lives with the others in
:mod:`tollway.events.schema`; this module is its name on the shadow side.
"""

from __future__ import annotations

from tollway.events.schema import SHADOW_COMPARED, ShadowCompared

__all__ = ["SHADOW_COMPARED", "ShadowCompared"]
