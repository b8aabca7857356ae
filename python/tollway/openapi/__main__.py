"""``python -m tollway.openapi [PATH]``: write the document to docs/openapi.json (or PATH)."""

from tollway.openapi.document import main

raise SystemExit(main())
