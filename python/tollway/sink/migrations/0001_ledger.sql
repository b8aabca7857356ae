-- tollway's ledger: one table per kind of event, keyed by event_id, and the stream position
-- the rows were written up to (committed in the same transaction as the rows).
-- Forward-only: a shipped file never changes (the sink checks its sha256); a change is a new
-- file. A column added later has a default, so older rows keep a value and an older sink,
-- which does not write it, keeps working.

CREATE TABLE sink_position (
    stream text PRIMARY KEY,
    last_seq bigint NOT NULL,
    stream_created text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE calls (
    event_id text PRIMARY KEY,
    seq bigint NOT NULL,
    occurred_at timestamptz NOT NULL,
    day date NOT NULL,
    outcome text NOT NULL,
    schema_version integer NOT NULL DEFAULT 1,
    tenant text NOT NULL DEFAULT '',
    request_id text NOT NULL DEFAULT '',
    instance text NOT NULL DEFAULT '',
    endpoint text NOT NULL DEFAULT '',
    route text NOT NULL DEFAULT '',
    provider text NOT NULL DEFAULT '',
    model text NOT NULL DEFAULT '',
    upstream_model text NOT NULL DEFAULT '',
    task text NOT NULL DEFAULT '',
    sensitivity text NOT NULL DEFAULT '',
    tier text NOT NULL DEFAULT '',
    latency_class text NOT NULL DEFAULT '',
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cache_read_tokens bigint NOT NULL DEFAULT 0,
    cache_write_tokens bigint NOT NULL DEFAULT 0,
    estimated_cost_nanousd bigint NOT NULL DEFAULT 0,
    actual_cost_nanousd bigint NOT NULL DEFAULT 0,
    latency_s double precision NOT NULL DEFAULT 0,
    ttft_s double precision,
    overhead_s double precision NOT NULL DEFAULT 0,
    attempts integer NOT NULL DEFAULT 0,
    fallbacks text[] NOT NULL DEFAULT '{}',
    stream boolean NOT NULL DEFAULT false,
    client_cancelled boolean NOT NULL DEFAULT false,
    status integer NOT NULL DEFAULT 0,
    error_type text,
    error_code text,
    error_message text,
    reason text NOT NULL DEFAULT '',
    reservation_id text NOT NULL DEFAULT '',
    max_tokens_bound integer,
    flags text[] NOT NULL DEFAULT '{}'
);
CREATE INDEX calls_tenant_day ON calls (tenant, day);
-- Rows arrive in time order: a BRIN index costs next to nothing to keep up.
CREATE INDEX calls_occurred_at ON calls USING brin (occurred_at);

-- budget.reserved, budget.settled, budget.released: the columns a kind does not carry are NULL.
CREATE TABLE budget_events (
    event_id text PRIMARY KEY,
    seq bigint NOT NULL,
    occurred_at timestamptz NOT NULL,
    type text NOT NULL,
    schema_version integer NOT NULL DEFAULT 1,
    tenant text NOT NULL DEFAULT '',
    request_id text NOT NULL DEFAULT '',
    instance text NOT NULL DEFAULT '',
    reservation_id text NOT NULL DEFAULT '',
    day date,
    amount_nanousd bigint,
    limit_nanousd bigint,
    expires_at timestamptz,
    actual_nanousd bigint,
    settled_nanousd bigint
);
CREATE INDEX budget_events_tenant_day ON budget_events (tenant, day);

CREATE TABLE breaker_events (
    event_id text PRIMARY KEY,
    seq bigint NOT NULL,
    occurred_at timestamptz NOT NULL,
    schema_version integer NOT NULL DEFAULT 1,
    tenant text NOT NULL DEFAULT '',
    request_id text NOT NULL DEFAULT '',
    instance text NOT NULL DEFAULT '',
    provider text NOT NULL DEFAULT '',
    previous text NOT NULL DEFAULT '',
    state text NOT NULL DEFAULT '',
    failures integer NOT NULL DEFAULT 0,
    reason text NOT NULL DEFAULT '',
    recovery_s double precision NOT NULL DEFAULT 0
);
CREATE INDEX breaker_events_provider ON breaker_events (provider, occurred_at);

CREATE TABLE shadow_events (
    event_id text PRIMARY KEY,
    seq bigint NOT NULL,
    occurred_at timestamptz NOT NULL,
    day date NOT NULL,
    schema_version integer NOT NULL DEFAULT 1,
    tenant text NOT NULL DEFAULT '',
    request_id text NOT NULL DEFAULT '',
    instance text NOT NULL DEFAULT '',
    route text NOT NULL DEFAULT '',
    endpoint text NOT NULL DEFAULT '',
    task text NOT NULL DEFAULT '',
    sensitivity text NOT NULL DEFAULT '',
    primary_provider text NOT NULL DEFAULT '',
    primary_model text NOT NULL DEFAULT '',
    candidate_provider text NOT NULL DEFAULT '',
    candidate_model text NOT NULL DEFAULT '',
    primary_stream boolean NOT NULL DEFAULT false,
    primary_latency_s double precision NOT NULL DEFAULT 0,
    primary_ttft_s double precision,
    candidate_latency_s double precision NOT NULL DEFAULT 0,
    candidate_delay_s double precision NOT NULL DEFAULT 0,
    primary_prompt_tokens bigint NOT NULL DEFAULT 0,
    primary_completion_tokens bigint NOT NULL DEFAULT 0,
    candidate_prompt_tokens bigint NOT NULL DEFAULT 0,
    candidate_completion_tokens bigint NOT NULL DEFAULT 0,
    primary_cost_nanousd bigint NOT NULL DEFAULT 0,
    candidate_cost_nanousd bigint NOT NULL DEFAULT 0,
    primary_finish_reason text NOT NULL DEFAULT '',
    candidate_finish_reason text NOT NULL DEFAULT '',
    candidate_status integer NOT NULL DEFAULT 0,
    candidate_error text,
    candidate_error_message text,
    agreement double precision,
    agreement_method text NOT NULL DEFAULT '',
    agreement_threshold double precision NOT NULL DEFAULT 0.8,
    agreed boolean NOT NULL DEFAULT false
);
CREATE INDEX shadow_events_route_day ON shadow_events (route, day);

-- tenant.*, key.*, flag.changed. subject_id: the key's id, or the flag's name; details: the
-- rest of the event (settings, limits, ...) as JSON. A key's hash is left out.
CREATE TABLE admin_events (
    event_id text PRIMARY KEY,
    seq bigint NOT NULL,
    occurred_at timestamptz NOT NULL,
    type text NOT NULL,
    schema_version integer NOT NULL DEFAULT 1,
    tenant text NOT NULL DEFAULT '',
    request_id text NOT NULL DEFAULT '',
    instance text NOT NULL DEFAULT '',
    admin text NOT NULL DEFAULT '',
    subject_id text NOT NULL DEFAULT '',
    details jsonb NOT NULL DEFAULT '{}'
);

-- What this sink could not read (a type it does not know, a newer schema_version, bytes that
-- are not an event): kept whole, so nothing on the stream is lost to SQL.
CREATE TABLE other_events (
    event_id text PRIMARY KEY,
    seq bigint NOT NULL,
    type text NOT NULL DEFAULT '',
    schema_version integer NOT NULL DEFAULT 0,
    body text NOT NULL
);
