-- Keygate's PostgreSQL schema, version 1: the SQLite schema after its 18 migrations, in PostgreSQL's
-- types. Every text column compares byte-wise (COLLATE "C"), as SQLite's BINARY does, so ids page in the
-- same order whatever the database's locale; name searches use lower(). Times are BIGINT milliseconds
-- since the Unix epoch; JSON is kept as TEXT, exactly as Keygate wrote it.

CREATE TABLE keygate_meta (
    key   TEXT COLLATE "C" PRIMARY KEY,
    value TEXT COLLATE "C" NOT NULL
);

-- Change numbers assigned in commit order: a writer takes the next number by updating its counter row,
-- whose lock it holds until it commits, so a later number is always committed later.
CREATE TABLE change_counters (
    name  TEXT COLLATE "C" PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO change_counters (name, value) VALUES ('key_secrets', 0), ('audit_events', 0);

CREATE TABLE consumers (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT COLLATE "C" NOT NULL,
    metadata    TEXT COLLATE "C" NOT NULL,
    disabled    BOOLEAN NOT NULL DEFAULT FALSE,
    system      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    rate_limits TEXT COLLATE "C",
    external_id TEXT COLLATE "C",
    leak_policy TEXT COLLATE "C" NOT NULL DEFAULT 'revoke'
);
CREATE UNIQUE INDEX consumers_by_external_id ON consumers (external_id) WHERE external_id IS NOT NULL;
CREATE INDEX consumers_by_name ON consumers (name);
CREATE INDEX consumers_by_name_lower ON consumers (lower(name));

CREATE TABLE api_keys (
    id                TEXT COLLATE "C" PRIMARY KEY,
    consumer_id       TEXT COLLATE "C" NOT NULL REFERENCES consumers (id),
    name              TEXT COLLATE "C" NOT NULL,
    environment       TEXT COLLATE "C" NOT NULL CHECK (environment IN ('live', 'test')),
    scopes            TEXT COLLATE "C" NOT NULL,
    metadata          TEXT COLLATE "C" NOT NULL,
    expires_at        BIGINT,
    disabled          BOOLEAN NOT NULL DEFAULT FALSE,
    revoked_at        BIGINT,
    start             TEXT COLLATE "C" NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    rate_limits       TEXT COLLATE "C",
    allowed_ips       TEXT COLLATE "C",
    quota_remaining   BIGINT,
    quota_refill      TEXT COLLATE "C",
    quota_refilled_at BIGINT,
    last_used_at      BIGINT,
    last_used_ip      TEXT COLLATE "C",
    imported          BOOLEAN NOT NULL DEFAULT FALSE,
    -- Nodes lease quota from quota_remaining (the pool); this changes whenever the pool is set, reset or
    -- refilled, so that units leased before are never given back into it.
    quota_epoch       BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_by_consumer ON api_keys (consumer_id, id);
CREATE INDEX api_keys_by_quota ON api_keys (quota_remaining) WHERE quota_remaining IS NOT NULL;
CREATE INDEX api_keys_by_expiry ON api_keys (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX api_keys_by_name ON api_keys (lower(name));
CREATE INDEX api_keys_by_start ON api_keys (start);

CREATE TABLE key_secrets (
    hash       BYTEA PRIMARY KEY,
    key_id     TEXT COLLATE "C" NOT NULL REFERENCES api_keys (id),
    start      TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    seq        BIGINT NOT NULL UNIQUE
);
CREATE INDEX key_secrets_by_key ON key_secrets (key_id);

CREATE TABLE audit_events (
    id          TEXT COLLATE "C" PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT COLLATE "C" NOT NULL,
    action      TEXT COLLATE "C" NOT NULL,
    target_type TEXT COLLATE "C" NOT NULL,
    target_id   TEXT COLLATE "C" NOT NULL,
    ip          TEXT COLLATE "C",
    details     TEXT COLLATE "C" NOT NULL,
    -- Change number in commit order: the nodes follow each other's changes by it.
    seq         BIGINT NOT NULL UNIQUE,
    -- The node that made it (each connection of a node sets keygate.node), so that a node does not apply
    -- its own changes a second time.
    origin      TEXT COLLATE "C" DEFAULT current_setting('keygate.node', true)
);
CREATE INDEX audit_events_by_target ON audit_events (target_id, id);

CREATE TABLE usage_buckets (
    key_id       TEXT COLLATE "C" NOT NULL,
    consumer_id  TEXT COLLATE "C" NOT NULL,
    granularity  TEXT COLLATE "C" NOT NULL CHECK (granularity IN ('minute', 'hour', 'day')),
    bucket_start BIGINT NOT NULL,
    code         TEXT COLLATE "C" NOT NULL,
    count        BIGINT NOT NULL,
    PRIMARY KEY (key_id, granularity, bucket_start, code)
);
CREATE INDEX usage_by_age ON usage_buckets (granularity, bucket_start, key_id, consumer_id, code, count);

CREATE TABLE usage_rollups (
    scope        TEXT COLLATE "C" NOT NULL,
    granularity  TEXT COLLATE "C" NOT NULL CHECK (granularity IN ('minute', 'hour', 'day')),
    bucket_start BIGINT NOT NULL,
    code         TEXT COLLATE "C" NOT NULL,
    count        BIGINT NOT NULL,
    PRIMARY KEY (scope, granularity, bucket_start, code)
);

CREATE TABLE oauth_clients (
    id                       TEXT COLLATE "C" PRIMARY KEY,
    consumer_id              TEXT COLLATE "C" NOT NULL REFERENCES consumers (id),
    name                     TEXT COLLATE "C" NOT NULL,
    grant_types              TEXT COLLATE "C" NOT NULL,
    scopes                   TEXT COLLATE "C" NOT NULL,
    audiences                TEXT COLLATE "C" NOT NULL,
    token_format             TEXT COLLATE "C" NOT NULL CHECK (token_format IN ('jwt', 'opaque')),
    token_lifetime_seconds   BIGINT NOT NULL,
    confidential             BOOLEAN NOT NULL,
    disabled                 BOOLEAN NOT NULL DEFAULT FALSE,
    tokens_revoked_before    BIGINT,
    secret_start             TEXT COLLATE "C",
    created_at               BIGINT NOT NULL,
    updated_at               BIGINT NOT NULL,
    auth_method              TEXT COLLATE "C" NOT NULL DEFAULT 'client_secret',
    jwks                     TEXT COLLATE "C",
    redirect_uris            TEXT COLLATE "C" NOT NULL DEFAULT '[]',
    refresh_idle_seconds     BIGINT NOT NULL DEFAULT 2592000,
    refresh_absolute_seconds BIGINT NOT NULL DEFAULT 7776000
);
CREATE INDEX oauth_clients_by_consumer ON oauth_clients (consumer_id);
CREATE INDEX oauth_clients_by_name ON oauth_clients (lower(name));

CREATE TABLE client_secrets (
    hash       BYTEA PRIMARY KEY,
    client_id  TEXT COLLATE "C" NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    start      TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);
CREATE INDEX client_secrets_by_client ON client_secrets (client_id);

CREATE TABLE signing_keys (
    kid           TEXT COLLATE "C" PRIMARY KEY,
    alg           TEXT COLLATE "C" NOT NULL,
    private_der   BYTEA NOT NULL,
    public_jwk    TEXT COLLATE "C" NOT NULL,
    created_at    BIGINT NOT NULL,
    active_from   BIGINT NOT NULL,
    retired_at    BIGINT,
    publish_until BIGINT,
    revoked_at    BIGINT
);

CREATE TABLE users (
    id             TEXT COLLATE "C" PRIMARY KEY,
    username       TEXT COLLATE "C" NOT NULL,
    username_key   TEXT COLLATE "C" NOT NULL UNIQUE,
    email          TEXT COLLATE "C",
    display_name   TEXT COLLATE "C",
    password_hash  TEXT COLLATE "C",
    allowed_scopes TEXT COLLATE "C",
    disabled       BOOLEAN NOT NULL DEFAULT FALSE,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    last_login_at  BIGINT,
    roles          TEXT COLLATE "C" NOT NULL DEFAULT '[]'
);
CREATE INDEX users_by_name ON users (lower(username));
CREATE INDEX users_by_email ON users (email) WHERE email IS NOT NULL;

CREATE TABLE scope_descriptions (
    scope       TEXT COLLATE "C" PRIMARY KEY,
    description TEXT COLLATE "C" NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE grants (
    id         TEXT COLLATE "C" PRIMARY KEY,
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_id  TEXT COLLATE "C" NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    scopes     TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE UNIQUE INDEX grants_live ON grants (user_id, client_id) WHERE revoked_at IS NULL;

CREATE TABLE token_families (
    id         TEXT COLLATE "C" PRIMARY KEY,
    grant_id   TEXT COLLATE "C" NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    client_id  TEXT COLLATE "C" NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT,
    jkt        TEXT COLLATE "C"
);
CREATE INDEX token_families_by_grant ON token_families (grant_id);
CREATE INDEX token_families_by_expiry ON token_families (expires_at);

CREATE TABLE access_tokens (
    hash       BYTEA PRIMARY KEY,
    jti        TEXT COLLATE "C" NOT NULL UNIQUE,
    client_id  TEXT COLLATE "C" NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    subject    TEXT COLLATE "C" NOT NULL,
    scopes     TEXT COLLATE "C" NOT NULL,
    audiences  TEXT COLLATE "C" NOT NULL,
    issued_at  BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT,
    family_id  TEXT COLLATE "C",
    source     TEXT COLLATE "C",
    jkt        TEXT COLLATE "C"
);
CREATE INDEX access_tokens_by_expiry ON access_tokens (expires_at);
CREATE INDEX access_tokens_by_family ON access_tokens (family_id) WHERE family_id IS NOT NULL;

CREATE TABLE revoked_jtis (
    jti        TEXT COLLATE "C" PRIMARY KEY,
    client_id  TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL
);

CREATE TABLE auth_codes (
    hash           BYTEA PRIMARY KEY,
    client_id      TEXT COLLATE "C" NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    user_id        TEXT COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    grant_id       TEXT COLLATE "C" NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    redirect_uri   TEXT COLLATE "C" NOT NULL,
    code_challenge TEXT COLLATE "C" NOT NULL,
    scopes         TEXT COLLATE "C" NOT NULL,
    audiences      TEXT COLLATE "C" NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    used_at        BIGINT,
    family_id      TEXT COLLATE "C"
);
CREATE INDEX auth_codes_by_expiry ON auth_codes (expires_at);

CREATE TABLE refresh_tokens (
    hash            BYTEA PRIMARY KEY,
    family_id       TEXT COLLATE "C" NOT NULL REFERENCES token_families (id) ON DELETE CASCADE,
    scopes          TEXT COLLATE "C" NOT NULL,
    audiences       TEXT COLLATE "C" NOT NULL,
    issued_at       BIGINT NOT NULL,
    idle_expires_at BIGINT NOT NULL,
    used_at         BIGINT
);
CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family_id);

CREATE TABLE personal_tokens (
    id           TEXT COLLATE "C" PRIMARY KEY,
    user_id      TEXT COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         TEXT COLLATE "C" NOT NULL,
    scopes       TEXT COLLATE "C" NOT NULL,
    audiences    TEXT COLLATE "C" NOT NULL DEFAULT '[]',
    hash         BYTEA NOT NULL UNIQUE,
    start        TEXT COLLATE "C" NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    last_used_at BIGINT,
    last_used_ip TEXT COLLATE "C",
    revoked_at   BIGINT
);
CREATE INDEX personal_tokens_by_user ON personal_tokens (user_id);
CREATE INDEX personal_tokens_by_expiry ON personal_tokens (expires_at) WHERE revoked_at IS NULL;

CREATE TABLE device_codes (
    hash           BYTEA PRIMARY KEY,
    user_code      TEXT COLLATE "C" NOT NULL UNIQUE,
    client_id      TEXT COLLATE "C" NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    scopes         TEXT COLLATE "C" NOT NULL,
    audiences      TEXT COLLATE "C" NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    interval_ms    BIGINT NOT NULL,
    last_polled_at BIGINT,
    status         TEXT COLLATE "C" NOT NULL,
    user_id        TEXT COLLATE "C" REFERENCES users (id) ON DELETE CASCADE,
    grant_id       TEXT COLLATE "C" REFERENCES grants (id) ON DELETE CASCADE,
    granted_scopes TEXT COLLATE "C"
);
CREATE INDEX device_codes_by_expiry ON device_codes (expires_at);

CREATE TABLE webhook_endpoints (
    id                     TEXT COLLATE "C" PRIMARY KEY,
    url                    TEXT COLLATE "C" NOT NULL,
    events                 TEXT COLLATE "C" NOT NULL,
    description            TEXT COLLATE "C",
    enabled                BOOLEAN NOT NULL DEFAULT TRUE,
    secret_sealed          BYTEA NOT NULL,
    previous_secret_sealed BYTEA,
    previous_secret_until  BIGINT,
    failing_since          BIGINT,
    last_failure_at        BIGINT,
    disabled_reason        TEXT COLLATE "C",
    created_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL
);

CREATE TABLE events (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id      TEXT COLLATE "C" NOT NULL UNIQUE,
    type    TEXT COLLATE "C" NOT NULL,
    at      BIGINT NOT NULL,
    payload TEXT COLLATE "C" NOT NULL,
    dedup   TEXT COLLATE "C" UNIQUE
);
CREATE INDEX events_by_at ON events (at);

CREATE TABLE webhook_deliveries (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id  TEXT COLLATE "C" NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id     TEXT COLLATE "C" NOT NULL,
    status       TEXT COLLATE "C" NOT NULL DEFAULT 'pending',
    attempts     BIGINT NOT NULL DEFAULT 0,
    next_at      BIGINT,
    leased_until BIGINT,
    created_at   BIGINT NOT NULL,
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX webhook_deliveries_pending_by_endpoint ON webhook_deliveries (endpoint_id, next_at)
    WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id BIGINT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    at          BIGINT NOT NULL,
    status_code BIGINT,
    latency_ms  BIGINT NOT NULL,
    error       TEXT COLLATE "C"
);
CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id, at);

CREATE TABLE leak_reports (
    id              TEXT COLLATE "C" PRIMARY KEY,
    at              BIGINT NOT NULL,
    reporter        TEXT COLLATE "C" NOT NULL,
    token_hash      TEXT COLLATE "C" NOT NULL,
    token_type      TEXT COLLATE "C" NOT NULL,
    url             TEXT COLLATE "C",
    source          TEXT COLLATE "C",
    label           TEXT COLLATE "C" NOT NULL,
    credential_type TEXT COLLATE "C",
    credential_id   TEXT COLLATE "C",
    action          TEXT COLLATE "C" NOT NULL
);

CREATE TABLE client_registrations (
    client_id  TEXT COLLATE "C" PRIMARY KEY REFERENCES oauth_clients (id) ON DELETE CASCADE,
    token_hash BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
