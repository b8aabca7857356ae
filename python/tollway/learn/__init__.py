"""Routing that learns from shadow evidence.

- :mod:`.evidence`: the rules and the fold: ``shadow.compared`` events in, decisions
  (``route.learned`` events) out; deterministic, so a replay of the same events makes
  the same decisions (:func:`.evidence.replay`)
- :mod:`.routing`: in the app: the learner fed by this process's shadow samples, its
  decisions published, and the plan hook that puts the chosen candidate first

How it works, and the agreement measure per task, is in :mod:`.evidence`.
"""
