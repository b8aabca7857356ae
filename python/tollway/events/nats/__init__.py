"""The project's own NATS client protocol code (see README.md here for its scope).

:mod:`.bulk` reads stream ranges on a raw connection; :mod:`.wire` publishes batches on
one. Everything else talks to NATS through nats-py, the reference behaviour.
"""
