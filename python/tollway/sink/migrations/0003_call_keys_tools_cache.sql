-- Call event fields added after 0001: the directory key and its own budget account
-- (per-key budgets), the registry tools a reply called (the tool registry) and the
-- response cache. Defaults as in the events, so older rows read what their events meant.
ALTER TABLE calls
    ADD COLUMN key_id text NOT NULL DEFAULT '',
    ADD COLUMN budget_scope text NOT NULL DEFAULT '',
    ADD COLUMN key_reservation_id text NOT NULL DEFAULT '',
    ADD COLUMN tool_calls text[] NOT NULL DEFAULT '{}',
    ADD COLUMN tool_calls_invalid text[] NOT NULL DEFAULT '{}',
    ADD COLUMN tool_retried boolean NOT NULL DEFAULT false,
    ADD COLUMN cache text NOT NULL DEFAULT '',
    ADD COLUMN saved_nanousd bigint NOT NULL DEFAULT 0;

-- Shadow calls that check a candidate serving live against the primary (learning routing).
ALTER TABLE shadow_events ADD COLUMN verify boolean NOT NULL DEFAULT false;
-- admin_events also holds tool.changed and tool.removed from here on (subject_id: the
-- tool's name).

-- Learning routing's decisions (route.learned): which model serves a route's task, and the
-- evidence it was decided on.
CREATE TABLE route_events (
    event_id text PRIMARY KEY,
    seq bigint NOT NULL,
    occurred_at timestamptz NOT NULL,
    schema_version integer NOT NULL DEFAULT 1,
    tenant text NOT NULL DEFAULT '',
    request_id text NOT NULL DEFAULT '',
    instance text NOT NULL DEFAULT '',
    route text NOT NULL DEFAULT '',
    task text NOT NULL DEFAULT '',
    model text NOT NULL DEFAULT '',
    previous text NOT NULL DEFAULT '',
    action text NOT NULL DEFAULT '',
    candidate text NOT NULL DEFAULT '',
    samples integer NOT NULL DEFAULT 0,
    agreement_rate double precision NOT NULL DEFAULT 0,
    agreement_rule text NOT NULL DEFAULT '',
    candidate_p95_s double precision,
    objective_s double precision,
    why text NOT NULL DEFAULT ''
);
CREATE INDEX route_events_route ON route_events (route, occurred_at);
