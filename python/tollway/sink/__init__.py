"""The ledger outside NATS: ``tollway sink postgres`` (every event into PostgreSQL, exactly
once) and ``tollway export parquet`` (the stream as Parquet files by day).

``ledger`` maps events to table rows (shared by both); ``migrations`` holds the versioned
schema; ``postgres`` and ``parquet`` need the ``sink`` extra (psycopg, pyarrow).
"""
