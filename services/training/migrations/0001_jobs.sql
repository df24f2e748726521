-- Datasets: files in the training store (content-addressed by sha256), named per tenant.
CREATE TABLE datasets (
    tenant      text NOT NULL,
    name        text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'),
    format      text NOT NULL CHECK (format IN ('csv', 'npz')),
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes  bigint NOT NULL CHECK (size_bytes >= 0),
    rows        bigint NOT NULL CHECK (rows >= 0),
    columns     bigint NOT NULL CHECK (columns >= 0),
    -- 'upload', or 'feedback:<model>'
    source      text NOT NULL,
    created_by  text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

-- The queue. A worker claims a job with SELECT ... FOR UPDATE SKIP LOCKED and holds it by a
-- lease it renews; a job whose lease expired is claimed again while attempts remain.
CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    tenant           text NOT NULL,
    created_by       text NOT NULL,
    plugin           text NOT NULL,
    plugin_version   text NOT NULL,
    -- validated, defaults filled in
    arguments        jsonb NOT NULL,
    dataset          text NOT NULL DEFAULT '',
    base_model       text NOT NULL DEFAULT '',
    model            text NOT NULL,
    alias            text NOT NULL DEFAULT '',
    promote_if       text NOT NULL DEFAULT '',
    idempotency_key  text,
    traceparent      text NOT NULL DEFAULT '',
    time_limit_s     integer NOT NULL CHECK (time_limit_s > 0),
    state            text NOT NULL CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL CHECK (max_attempts > 0),
    lease_owner      text,
    lease_expires    timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    progress         double precision NOT NULL DEFAULT 0,
    progress_message text NOT NULL DEFAULT '',
    metrics          jsonb NOT NULL DEFAULT '{}',
    error            text NOT NULL DEFAULT '',
    -- the trained model, kept in the training store once an attempt produced it: a retry
    -- registers these bytes instead of training again, so the registry (which returns the
    -- existing version for bytes it has) never gets a second version from one job
    artifact_sha256  text,
    version          bigint,
    promoted         boolean NOT NULL DEFAULT false,
    create_time      timestamptz NOT NULL DEFAULT now(),
    start_time       timestamptz,
    end_time         timestamptz,
    UNIQUE (tenant, idempotency_key)
);
-- what workers scan: unfinished jobs, oldest first
CREATE INDEX jobs_open ON jobs (create_time) WHERE state IN ('QUEUED', 'RUNNING');
CREATE INDEX jobs_tenant_time ON jobs (tenant, create_time DESC, id);

-- Everything that happens to a job, in order; WatchJob reads it, workers wake on its NOTIFY.
CREATE TABLE job_events (
    id     bigserial PRIMARY KEY,
    job_id uuid NOT NULL REFERENCES jobs (id),
    time   timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind   text NOT NULL CHECK (kind IN ('state', 'progress', 'metric', 'log')),
    data   jsonb NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, id);
