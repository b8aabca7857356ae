-- The daily usage the gateway's /api/ai/usage reports, as views over the ledger.

-- One row per tenant, day (UTC), model and provider: the same rows and sums as
-- GET /api/ai/usage (requests counts every call event, whatever its outcome).
CREATE VIEW usage_daily AS
SELECT day, tenant, model, provider,
       count(*) AS requests,
       count(*) FILTER (WHERE outcome = 'completed') AS completed,
       count(*) FILTER (WHERE outcome = 'failed') AS failed,
       count(*) FILTER (WHERE outcome = 'rejected') AS rejected,
       sum(prompt_tokens) AS prompt_tokens,
       sum(completion_tokens) AS completion_tokens,
       sum(actual_cost_nanousd) AS cost_nanousd,
       sum(actual_cost_nanousd) / 1e9 AS cost_usd
FROM calls
GROUP BY day, tenant, model, provider;

-- Spend per tenant per day.
CREATE VIEW spend_daily AS
SELECT day, tenant,
       count(*) AS requests,
       sum(actual_cost_nanousd) AS cost_nanousd,
       sum(actual_cost_nanousd) / 1e9 AS cost_usd
FROM calls
GROUP BY day, tenant;

-- Calls that reached a provider (completed or failed), per provider per hour (UTC).
CREATE VIEW provider_hourly AS
SELECT date_trunc('hour', occurred_at AT TIME ZONE 'UTC') AS hour, provider,
       count(*) AS calls,
       count(*) FILTER (WHERE outcome = 'failed') AS failed,
       (count(*) FILTER (WHERE outcome = 'failed'))::double precision / count(*) AS error_rate,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_s) AS p95_latency_s
FROM calls
WHERE outcome <> 'rejected'
GROUP BY 1, provider;
