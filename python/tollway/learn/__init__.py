"""Routing that learns from shadow evidence.

- :mod:`.evidence`: the rules and the fold: ``shadow.compared`` events in, decisions
  (``route.learned`` events) out; deterministic, so a replay of the same events makes
  the same decisions (:func:`.evidence.replay`)
- :mod:`.view`: with events on, that fold as a view of the stream (every process's
  samples, in stream order, checkpointed): one choice for the fleet
- :mod:`.routing`: in the app: the learner (the stream's view, or with events off this
  process's own samples), its decisions published, and the plan hook that puts the
  chosen candidate first

How it works, and the agreement measure per task, is in :mod:`.evidence`.
"""
