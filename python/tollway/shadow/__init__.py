"""Shadow mode and A/B evaluation of candidate models.

- ``[[shadow]]`` tables (per route: candidates, caps, A/B weights): their shape and checks
  are :class:`tollway.config.ShadowRouteConfig` and :func:`tollway.config.check_shadow`
- :mod:`.runner`: shadow calls in the background after the caller has its answer
- :mod:`.ab`: the live A/B split, sticky per tenant or user
- :mod:`.sampling`, :mod:`.spend`: the sampled fraction, the A/B arm, the daily spend cap
- :mod:`.agreement`: how far two answers agree, in [0, 1]
- :mod:`.event`, :mod:`.sink`: the ``ShadowCompared`` event and where it goes
- :mod:`.projection`, :mod:`.report`: the fold over those events and the report
- :mod:`.service`, :mod:`.wiring`, :mod:`.cli`: inside the app (``GET /api/ai/shadow``),
  ``tollway shadow report``

Submodules are imported on use: the events layer imports :mod:`.projection`
without pulling in the pipeline.
"""
