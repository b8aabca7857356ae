"""The response cache: exact-match answers of chat completions, shared by a fleet.

- :mod:`.key`: which calls may use it (opt-in, temperature, ``Cache-Control``) and
  the key (tenant, the model actually resolved, the canonical request)
- :mod:`.entry`: what is kept of an answer, the answer rebuilt as JSON or as SSE, and
  the whole completion read back out of a relayed stream
- :mod:`.store`: entries in this process's memory (every lookup), mirrored from and
  written to a NATS KV bucket that every gateway of the fleet watches
- :mod:`.wiring`: the app layer: a pipeline responder (hits) and finisher (stores)

Scope: ``POST /api/ai/v1/chat/completions``, plain and streamed. The other
surfaces (embeddings, legacy completions, Messages, Responses) are not cached.
"""
