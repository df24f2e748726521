-- API keys. Rows are never deleted: a revoked key keeps its row (and its usage stays
-- attributable), and its id is never reissued.
CREATE TABLE api_keys (
    -- the public part of the key (smk_<id>_<secret>): shown in listings, logs and usage
    id              text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    tenant          text NOT NULL CHECK (tenant <> ''),
    scopes          text[] NOT NULL CHECK (cardinality(scopes) > 0),
    -- sha256 of the whole plaintext key; the plaintext itself is never stored
    hash            bytea NOT NULL CHECK (octet_length(hash) = 32),
    description     text NOT NULL DEFAULT '',
    created_by      text NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT now(),
    revoke_time     timestamptz,
    -- refreshed at most about once a minute per gateway process
    last_used_time  timestamptz,
    -- this key's token bucket; both NULL: the gateway's default rate
    rate_per_second double precision CHECK (rate_per_second > 0),
    burst           integer CHECK (burst > 0),
    CHECK ((rate_per_second IS NULL) = (burst IS NULL))
);
CREATE INDEX api_keys_tenant_id ON api_keys (tenant, id);

-- Requests and scored rows per key, model and hour. Gateways add to a row with
-- INSERT ... ON CONFLICT DO UPDATE, so replicas' counts sum. model is '' for requests that
-- name no model. No foreign key to api_keys: a flush must never fail on a referential check
-- (keys are never deleted anyway); tenant is copied so per-tenant reads need no join.
CREATE TABLE usage (
    key_id   text NOT NULL,
    tenant   text NOT NULL,
    model    text NOT NULL,
    -- the start of the hour the requests arrived in
    bucket   timestamptz NOT NULL,
    requests bigint NOT NULL CHECK (requests >= 0),
    rows     bigint NOT NULL CHECK (rows >= 0),
    PRIMARY KEY (key_id, model, bucket)
);
CREATE INDEX usage_tenant_bucket ON usage (tenant, bucket);
