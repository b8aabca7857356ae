"""The tool registry: tools (name, description, JSON Schema, tenants allowed) kept by the
gateway, named by requests, and the calls a reply makes to them checked.

- :mod:`.schema`: a tool's JSON Schema, checked when it is registered and compiled once.
- :mod:`.registry`: the tools of the config (``[[tools]]``) and of the admin API (admin
  events folded into the directory), as one lookup.
- :mod:`.calls`: the pipeline's side. A decode hook inlines the registry tools a chat
  request names (``{"type": "registry", "name": ...}`` in ``tools``); a reply hook
  checks a whole reply's tool-call arguments (and asks once more when configured); the
  stream's last bytes check the arguments the relay collected, once, at the end.
"""
