"""tollway's own OpenAPI 3.1 document, built from the code's structs (never by hand).

:mod:`.operations` lists every operation the app serves; :mod:`.wire` and
:mod:`.views` hold the structs of the bodies that no handler module owns;
:mod:`.document` turns the table into the document served at
``GET /api/ai/openapi.json``.
"""

from tollway.openapi.document import build, encoded

__all__ = ["build", "encoded"]
