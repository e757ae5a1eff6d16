"""The schema, created and migrated at start-up: idempotent, versioned, and under an advisory lock,
since several dynos start at once."""

from __future__ import annotations

from llm_proxy.storage.postgres.database import Database

MIGRATION_LOCK = 7_210_001
"""pg_advisory_xact_lock key held while the schema is checked and migrated."""

# Each entry takes the schema from its index to the next version; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE SEQUENCE llm_proxy_lease_tokens;
    -- state: 0 waiting (never handed out), 1 waiting again, 2 claimed, 3 finished.
    CREATE TABLE llm_proxy_jobs (
        ticket bigserial PRIMARY KEY,
        request_id text NOT NULL UNIQUE,
        owner text NOT NULL,
        body text NOT NULL,
        submitted_at bigint NOT NULL,
        relay boolean NOT NULL DEFAULT false,
        state smallint NOT NULL DEFAULT 0,
        holder text,
        token bigint,
        lease_expires_at timestamptz,
        calling boolean NOT NULL DEFAULT false,
        cancel_requested boolean NOT NULL DEFAULT false,
        finished_at timestamptz
    );
    CREATE INDEX llm_proxy_jobs_waiting ON llm_proxy_jobs (ticket) WHERE state < 2;
    CREATE INDEX llm_proxy_jobs_claimed ON llm_proxy_jobs (lease_expires_at) WHERE state = 2;
    CREATE INDEX llm_proxy_jobs_finished ON llm_proxy_jobs (ticket) WHERE state = 3;
    CREATE TABLE llm_proxy_idempotency (
        owner text NOT NULL,
        key text NOT NULL,
        request_id text NOT NULL,
        body_hash text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (owner, key)
    );
    CREATE TABLE llm_proxy_statuses (
        request_id text PRIMARY KEY,
        entry text NOT NULL,
        expires_at timestamptz
    );
    CREATE INDEX llm_proxy_statuses_expiry ON llm_proxy_statuses (expires_at) WHERE expires_at IS NOT NULL;
    -- state: 0 owed, 1 taken by a sender until taken_until, 2 done.
    CREATE TABLE llm_proxy_outbox (
        id bigserial PRIMARY KEY,
        request_id text NOT NULL,
        owner text NOT NULL,
        url text NOT NULL,
        payload text NOT NULL,
        state smallint NOT NULL DEFAULT 0,
        taken_until timestamptz
    );
    CREATE INDEX llm_proxy_outbox_owed ON llm_proxy_outbox (id) WHERE state < 2;
    CREATE TABLE llm_proxy_settings (name text PRIMARY KEY, value text NOT NULL);
    """,
    # Waiting and in-flight counts kept by a trigger, so a submit does not count the whole backlog.
    # Spread over 16 rows per count (by server process), so concurrent writers rarely wait on one.
    """
    CREATE TABLE llm_proxy_counts (
        name text NOT NULL, shard integer NOT NULL, n bigint NOT NULL, PRIMARY KEY (name, shard)
    );
    INSERT INTO llm_proxy_counts
        SELECT 'waiting', 0, count(*) FROM llm_proxy_jobs WHERE state < 2
        UNION ALL SELECT 'in_flight', 0, count(*) FROM llm_proxy_jobs WHERE state = 2;
    CREATE FUNCTION llm_proxy_bucket(state smallint) RETURNS text LANGUAGE sql IMMUTABLE AS
        $$ SELECT CASE WHEN state < 2 THEN 'waiting' WHEN state = 2 THEN 'in_flight' END $$;
    CREATE FUNCTION llm_proxy_bump(bucket text, delta integer) RETURNS void LANGUAGE sql AS $$
        INSERT INTO llm_proxy_counts VALUES (bucket, pg_backend_pid() % 16, delta)
        ON CONFLICT (name, shard) DO UPDATE SET n = llm_proxy_counts.n + excluded.n
    $$;
    CREATE FUNCTION llm_proxy_count() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        was text := CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE llm_proxy_bucket(OLD.state) END;
        now_in text := CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE llm_proxy_bucket(NEW.state) END;
    BEGIN
        IF was IS DISTINCT FROM now_in THEN
            IF was IS NOT NULL THEN PERFORM llm_proxy_bump(was, -1); END IF;
            IF now_in IS NOT NULL THEN PERFORM llm_proxy_bump(now_in, 1); END IF;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER llm_proxy_count AFTER INSERT OR DELETE OR UPDATE OF state ON llm_proxy_jobs
        FOR EACH ROW EXECUTE FUNCTION llm_proxy_count();
    """,
    # Each worker's last heartbeat, stamped by the server's clock (workers and web processes may
    # run on machines whose clocks differ), for /health.
    """
    CREATE TABLE llm_proxy_heartbeats (holder text PRIMARY KEY, beat_at timestamptz NOT NULL);
    """,
    # The dashboard's index of requests per owner: the listed fields of each status, written by
    # the statements that write the status (from one small JSON document each, read through the
    # record type llm_proxy_listing), and the waiting jobs per owner (those without a status yet).
    # Rows stored before this version get the fields their entry holds.
    """
    CREATE TYPE llm_proxy_listing AS (
        owner text, status text, submitted_at bigint, endpoint text, model text, attempts integer,
        error_type text, finished_at bigint, upstream_ms integer, webhook text
    );
    ALTER TABLE llm_proxy_statuses
        ADD COLUMN owner text, ADD COLUMN status text, ADD COLUMN submitted_at bigint,
        ADD COLUMN endpoint text, ADD COLUMN model text, ADD COLUMN attempts integer,
        ADD COLUMN error_type text, ADD COLUMN finished_at bigint, ADD COLUMN upstream_ms integer,
        ADD COLUMN webhook text;
    -- An entry that is not JSON for Postgres (Python writes NaN) stays unlisted, rather than
    -- stopping the migration.
    CREATE FUNCTION pg_temp.entry_json(entry text) RETURNS json LANGUAGE plpgsql AS $$
    BEGIN RETURN entry::json; EXCEPTION WHEN others THEN RETURN NULL; END $$;
    UPDATE llm_proxy_statuses AS s SET
        owner = e.j ->> 'owner',
        status = e.j ->> 'status',
        submitted_at = coalesce(e.j ->> 'submitted_at', e.j ->> 'timestamp')::bigint,
        endpoint = '/v1/chat/completions',
        attempts = coalesce(e.j ->> 'attempts', e.j -> 'error' ->> 'attempts', '0')::integer,
        error_type = e.j -> 'error' ->> 'type',
        finished_at = CASE WHEN e.j ->> 'status' IN ('completed', 'error', 'cancelled')
            THEN (e.j ->> 'timestamp')::bigint END,
        webhook = e.j -> 'webhook' ->> 'state'
    FROM (SELECT request_id, pg_temp.entry_json(entry) AS j FROM llm_proxy_statuses) AS e
    WHERE e.request_id = s.request_id AND e.j IS NOT NULL;
    CREATE INDEX llm_proxy_statuses_newest
        ON llm_proxy_statuses (owner, submitted_at DESC, request_id DESC);
    CREATE INDEX llm_proxy_statuses_by_status
        ON llm_proxy_statuses (owner, status, submitted_at DESC, request_id DESC);
    CREATE INDEX llm_proxy_statuses_finished
        ON llm_proxy_statuses (owner, finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX llm_proxy_statuses_webhooks
        ON llm_proxy_statuses (owner, webhook) WHERE webhook IN ('pending', 'failed');
    CREATE INDEX llm_proxy_jobs_owner
        ON llm_proxy_jobs (owner, submitted_at DESC, request_id DESC) WHERE state < 3;
    """,
    # Rate limits: each job's model, so claims can pass over the models held back, and each
    # model's shared rate-limit state (``llm_proxy.ratelimit.book``; ``*`` for the whole upstream)
    # with until when it is held back (seconds since the epoch, for waiting jobs' statuses). Jobs
    # queued before this version count as model '' (their bodies are not parsed here: one that is
    # not valid JSON for Postgres would stop the migration).
    """
    ALTER TABLE llm_proxy_jobs ADD COLUMN model text NOT NULL DEFAULT '';
    CREATE TABLE llm_proxy_rates (
        model text PRIMARY KEY, state text NOT NULL DEFAULT '{}', throttled_until double precision
    );
    """,
    # A claim's start in one round trip instead of five: take the claim lock, free the slots of
    # calls that ended, count the slots in use, read the rate-limit state and lock the oldest
    # waiting jobs that fit. Each statement in a VOLATILE function takes a fresh snapshot, so the
    # count sees every claim committed before the lock was granted.
    """
    CREATE FUNCTION llm_proxy_claim_start(
        lock_key bigint, ended_tickets bigint[], ended_tokens bigint[], wanted integer, ceiling integer
    ) RETURNS json LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        free integer;
        rates json;
        candidates json;
    BEGIN
        PERFORM pg_advisory_xact_lock(lock_key);
        -- Rows a finishing statement holds are passed over, never waited for: that statement may
        -- wait for rows this claim holds (a deadlock, broken only after deadlock_timeout), and
        -- once it commits the row is no longer counted anyway.
        UPDATE llm_proxy_jobs SET calling = false
        WHERE ticket IN (
            SELECT ticket FROM llm_proxy_jobs
            WHERE state = 2 AND calling
                AND (ticket, token) IN (SELECT * FROM unnest(ended_tickets, ended_tokens))
            FOR UPDATE SKIP LOCKED
        );
        SELECT GREATEST(0, LEAST(wanted, ceiling - count(*))) INTO free
        FROM llm_proxy_jobs WHERE state = 2 AND calling AND lease_expires_at > now();
        SELECT coalesce(json_object_agg(model, state), '{}') INTO rates FROM llm_proxy_rates;
        SELECT coalesce(json_agg(json_build_array(ticket, request_id, model, body) ORDER BY ticket), '[]')
        INTO candidates
        FROM (
            SELECT ticket, request_id, model, body FROM llm_proxy_jobs
            WHERE state < 2 ORDER BY ticket LIMIT free FOR UPDATE SKIP LOCKED
        ) AS oldest;
        RETURN json_build_object('free', free, 'rates', rates, 'candidates', candidates);
    END $$;
    """,
    # Who took a webhook delivery: only that sender may keep it, so a sender cut off for longer
    # than its hold learns that it lost the delivery instead of both senders keeping it.
    """
    ALTER TABLE llm_proxy_outbox ADD COLUMN taken_by text;
    """,
    # The claim's start again, its candidates with all a job's fields, so that the statement
    # leasing them can also store their first attempt's status. The previous function stays for
    # processes of the previous version while a deploy rolls over.
    """
    CREATE FUNCTION llm_proxy_claim_begin(
        lock_key bigint, ended_tickets bigint[], ended_tokens bigint[], wanted integer, ceiling integer
    ) RETURNS json LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        free integer;
        rates json;
        candidates json;
    BEGIN
        PERFORM pg_advisory_xact_lock(lock_key);
        -- Rows a finishing statement holds are passed over, never waited for: that statement may
        -- wait for rows this claim holds (a deadlock, broken only after deadlock_timeout), and
        -- once it commits the row is no longer counted anyway.
        UPDATE llm_proxy_jobs SET calling = false
        WHERE ticket IN (
            SELECT ticket FROM llm_proxy_jobs
            WHERE state = 2 AND calling
                AND (ticket, token) IN (SELECT * FROM unnest(ended_tickets, ended_tokens))
            FOR UPDATE SKIP LOCKED
        );
        SELECT GREATEST(0, LEAST(wanted, ceiling - count(*))) INTO free
        FROM llm_proxy_jobs WHERE state = 2 AND calling AND lease_expires_at > now();
        SELECT coalesce(json_object_agg(model, state), '{}') INTO rates FROM llm_proxy_rates;
        SELECT coalesce(json_agg(json_build_array(
            ticket, request_id, model, body, owner, submitted_at, relay, state, cancel_requested
        ) ORDER BY ticket), '[]')
        INTO candidates
        FROM (
            SELECT ticket, request_id, model, body, owner, submitted_at, relay, state, cancel_requested
            FROM llm_proxy_jobs WHERE state < 2 ORDER BY ticket LIMIT free FOR UPDATE SKIP LOCKED
        ) AS oldest;
        RETURN json_build_object('free', free, 'rates', rates, 'candidates', candidates);
    END $$;
    """,
    # Dashboard sessions signed out before their expiry; a row goes once that expiry passes.
    """
    CREATE TABLE llm_proxy_signed_out (session text PRIMARY KEY, until timestamptz NOT NULL);
    """,
)


def migrate(database: Database) -> int:
    """Bring the schema to the newest version; returns it. Safe to run from many processes at once."""
    with database.transaction("cannot set up the database schema") as connection:
        # A migration may rewrite a large table, and other processes starting meanwhile wait for
        # it here: the pool's per-statement limit (meant for requests) would cancel both, and each
        # start would try again and fail the same way.
        connection.execute("SET LOCAL statement_timeout = 0")
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        connection.execute("CREATE TABLE IF NOT EXISTS llm_proxy_schema (version integer NOT NULL)")
        row = connection.execute("SELECT version FROM llm_proxy_schema").fetchone()
        version = 0 if row is None else int(row[0])
        if row is None:
            connection.execute("INSERT INTO llm_proxy_schema VALUES (0)")
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"the database schema is at version {version}, newer than this code knows ({len(MIGRATIONS)})"
            )
        for step in MIGRATIONS[version:]:
            connection.execute(step)
        connection.execute("UPDATE llm_proxy_schema SET version = %s", (len(MIGRATIONS),))
    return len(MIGRATIONS)
