-- Plans (named usage controls consumers are put on), consumers owned by users (the developer portal's
-- applications), verified email addresses. `consumers_v` is what every read of a consumer sees: the
-- plan's rate limits for a consumer on a plan, and whether its owner is suspended (an owner that no
-- longer exists counts as suspended: an application never outlives its developer). A later migration
-- that adds a column to consumers must also replace the view (PostgreSQL fixes a view's columns).
CREATE TABLE plans (
    id                   TEXT COLLATE "C" PRIMARY KEY,
    name                 TEXT COLLATE "C" NOT NULL,
    name_key             TEXT COLLATE "C" NOT NULL UNIQUE,
    description          TEXT COLLATE "C",
    rate_limits          TEXT COLLATE "C",
    quota                TEXT COLLATE "C",
    allowed_scopes       TEXT COLLATE "C",
    key_lifetime_seconds BIGINT,
    self_service         BOOLEAN NOT NULL DEFAULT FALSE,
    is_default           BOOLEAN NOT NULL DEFAULT FALSE,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL
);
CREATE UNIQUE INDEX plans_one_default ON plans (is_default) WHERE is_default;
ALTER TABLE consumers ADD COLUMN owner_id TEXT COLLATE "C";
ALTER TABLE consumers ADD COLUMN plan_id TEXT COLLATE "C" REFERENCES plans (id);
CREATE INDEX consumers_by_owner ON consumers (owner_id) WHERE owner_id IS NOT NULL;
CREATE INDEX consumers_by_plan ON consumers (plan_id) WHERE plan_id IS NOT NULL;
ALTER TABLE users ADD COLUMN email_verified_at BIGINT;
CREATE INDEX users_by_email_lower ON users (lower(email)) WHERE email IS NOT NULL;
CREATE VIEW consumers_v AS
    SELECT c.id, c.name, c.metadata, c.disabled, c.system, c.created_at, c.updated_at,
           CASE WHEN c.plan_id IS NULL THEN c.rate_limits ELSE p.rate_limits END AS rate_limits,
           c.external_id, c.leak_policy, c.owner_id, c.plan_id,
           CASE WHEN c.owner_id IS NULL THEN FALSE WHEN u.id IS NULL THEN TRUE ELSE u.disabled END AS owner_disabled
    FROM consumers c LEFT JOIN plans p ON p.id = c.plan_id LEFT JOIN users u ON u.id = c.owner_id;
