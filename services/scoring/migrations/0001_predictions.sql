-- The prediction log and the feedback given on predictions, from which the training service
-- builds datasets. Both are append-only.

-- One tensor as the Open Inference Protocol lays it out: raw little-endian contents, BYTES
-- elements each prefixed by their 4-byte little-endian length. A composite type keeps a
-- prediction in one row (one INSERT per prediction) while staying readable in SQL:
--   SELECT (t).name, (t).datatype, (t).shape FROM predictions, unnest(inputs) t;
CREATE TYPE logged_tensor AS (
    name     text,
    datatype text,
    shape    bigint[],
    contents bytea
);

-- Logging is sampled (SCOREMESH_PREDICTION_LOG_RATE), so a request id may have no row here.
-- A request id is logged once: a retried request that reuses its id keeps the first row.
CREATE TABLE predictions (
    request_id  text PRIMARY KEY,
    tenant      text NOT NULL,
    model       text NOT NULL,
    version     bigint NOT NULL,
    backend     text NOT NULL,
    inputs      logged_tensor[] NOT NULL,
    outputs     logged_tensor[] NOT NULL,
    -- when the prediction was served, not when the log write landed
    create_time timestamptz NOT NULL
);
-- a model's predictions newest first (scanned backwards), all versions or one
CREATE INDEX predictions_model_time ON predictions (tenant, model, create_time, request_id);
CREATE INDEX predictions_version_time ON predictions (tenant, model, version, create_time, request_id);

-- Not a foreign key to predictions: feedback may name a prediction that was not sampled, or
-- arrive before its log write lands. Feedback joins its prediction by (request_id, tenant).
CREATE TABLE feedback (
    id          bigserial PRIMARY KEY,
    request_id  text NOT NULL,
    tenant      text NOT NULL,
    label       text,
    tensor      logged_tensor,
    created_by  text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    CHECK (num_nonnulls(label, tensor) = 1)
);
-- a prediction's feedback oldest first, and the "has feedback" probe of with-feedback-only lists
CREATE INDEX feedback_request ON feedback (tenant, request_id, id);
