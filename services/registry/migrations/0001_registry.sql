-- The registry's tables. Versions are immutable: rows in model_versions are never updated.
CREATE TABLE models (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    tenant      text NOT NULL,
    description text NOT NULL DEFAULT '',
    visibility  text NOT NULL CHECK (visibility IN ('private', 'public')),
    created_by  text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX models_tenant_name ON models (tenant, name);

CREATE TABLE model_versions (
    model_id    bigint NOT NULL REFERENCES models (id),
    version     bigint NOT NULL CHECK (version > 0),
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes  bigint NOT NULL CHECK (size_bytes >= 0),
    signature   jsonb NOT NULL,
    status      text NOT NULL CHECK (status IN ('ready', 'failed')),
    report      jsonb NOT NULL,
    created_by  text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version),
    -- the same bytes pushed to the same model twice are one version
    UNIQUE (model_id, sha256)
);

CREATE TABLE aliases (
    model_id    bigint NOT NULL REFERENCES models (id),
    alias       text NOT NULL,
    version     bigint NOT NULL,
    updated_by  text NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, alias),
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);

-- the audit trail of every alias move; from/to 0 mean "did not exist" / "deleted"
CREATE TABLE alias_changes (
    id           bigserial PRIMARY KEY,
    model_id     bigint NOT NULL REFERENCES models (id),
    alias        text NOT NULL,
    from_version bigint NOT NULL,
    to_version   bigint NOT NULL,
    actor        text NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alias_changes_model ON alias_changes (model_id, id DESC);

CREATE TABLE model_cards (
    model_id    bigint NOT NULL,
    version     bigint NOT NULL,
    metrics     jsonb NOT NULL DEFAULT '{}',
    thresholds  jsonb NOT NULL DEFAULT '[]',
    description text NOT NULL DEFAULT '',
    updated_by  text NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version),
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);

-- what WatchModels streams; ids are handed out under an advisory lock held to commit, so
-- they grow in commit order and "id > cursor" never skips a late-committing event
CREATE TABLE model_events (
    id               bigserial PRIMARY KEY,
    type             text NOT NULL,
    model            text NOT NULL,
    version          bigint NOT NULL DEFAULT 0,
    alias            text NOT NULL DEFAULT '',
    previous_version bigint NOT NULL DEFAULT 0,
    actor            text NOT NULL,
    create_time      timestamptz NOT NULL DEFAULT now()
);
