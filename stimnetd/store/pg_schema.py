"""The PostgreSQL store's schema migrations, applied in order; `schema_version` records how
far a database got.

Never edit a released migration: append a new one. The tables and columns are the SQLite
store's (store/schema.py) where the PostgreSQL store has the verb, in PostgreSQL's types,
plus what only replicas need: who holds a running job and until when (the lease).
"""

PG_MIGRATIONS: tuple[str, ...] = (
    # 1: audit chain, jobs (with the replica lease), privacy ledger, releases
    """
    CREATE TABLE audit (
        seq BIGINT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        decision TEXT NOT NULL,
        detail_json TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit (at);

    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        scope TEXT NOT NULL,
        catalog TEXT NOT NULL,
        owner TEXT NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        request_id TEXT NOT NULL,
        origin TEXT NOT NULL,
        payload BYTEA NOT NULL,
        signature BYTEA NOT NULL,
        signer_cert BYTEA NOT NULL,
        script BYTEA,
        script_sha256 TEXT NOT NULL DEFAULT '',
        sites_json TEXT NOT NULL DEFAULT '[]',
        result BYTEA,
        attempts INTEGER NOT NULL DEFAULT 0,
        -- The replica running the job and until when its claim holds without renewal.
        claimed_by TEXT,
        lease_until DOUBLE PRECISION
    );
    CREATE INDEX jobs_state_created ON jobs (state, created_at);

    CREATE TABLE ledger (
        id BIGSERIAL PRIMARY KEY,
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        job_id TEXT NOT NULL,
        epsilon DOUBLE PRECISION NOT NULL,
        delta DOUBLE PRECISION NOT NULL DEFAULT 0,
        at DOUBLE PRECISION NOT NULL,
        UNIQUE (job_id, catalog)
    );
    CREATE INDEX ledger_owner ON ledger (researcher, catalog);

    CREATE TABLE releases (
        job_id TEXT PRIMARY KEY,
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        decision TEXT NOT NULL,
        epsilon DOUBLE PRECISION,
        cohort_digest TEXT NOT NULL,
        partials BYTEA,
        at DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: the site secret (HMAC key of cohort fingerprints: every replica must use the same
    # one, or the overlap guard would not recognise a cohort another replica released) and
    # the scripts the site's admins approved (an approval on one replica holds on all).
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
    CREATE TABLE approvals (
        script_sha256 TEXT PRIMARY KEY,
        approved_by TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL
    );
    """,
    # 3: signed-request nonces, shared so that a request replayed to another replica is
    # refused there too.
    """
    CREATE TABLE nonces (
        nonce TEXT PRIMARY KEY,
        signer TEXT NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX nonces_seen ON nonces (seen_at);
    """,
    # 4: restarts (or expired leases) that re-queued a job interrupted mid-run: the SQLite
    # store's migration 8, for the same cap (a job is re-queued once).
    """
    ALTER TABLE jobs ADD COLUMN requeues INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: what a daemon needs beyond the replica verbs, as in the SQLite store: charges
    # refunded when no byte of their release left the site (SQLite 7), the overlap guard's
    # cohort history with sketches and grouped queries' families (SQLite 1, 3, 4), exact
    # auditing's linear history (SQLite 6, with `id` for its insertion order), gossip
    # members, and the indexes job listings and retention read.
    """
    ALTER TABLE ledger ADD COLUMN refunded_at DOUBLE PRECISION;
    CREATE INDEX releases_owner ON releases (researcher, catalog);
    CREATE TABLE cohorts (
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        members_json TEXT NOT NULL,
        PRIMARY KEY (researcher, catalog, digest)
    );
    CREATE INDEX cohorts_size ON cohorts (researcher, catalog, size);
    CREATE TABLE cohort_sketches (
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        digest TEXT NOT NULL,
        sketch BYTEA NOT NULL,
        PRIMARY KEY (researcher, catalog, digest)
    );
    CREATE TABLE cohort_families (
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        digest TEXT NOT NULL,
        sizes_json TEXT NOT NULL,
        atoms_json TEXT NOT NULL,
        PRIMARY KEY (researcher, catalog, digest)
    );
    CREATE TABLE linear_cohorts (
        id BIGSERIAL UNIQUE,
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        quantity TEXT NOT NULL,
        digest TEXT NOT NULL,
        job_id TEXT NOT NULL,
        PRIMARY KEY (researcher, catalog, quantity, digest)
    );
    CREATE TABLE members (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        incarnation BIGINT NOT NULL,
        status TEXT NOT NULL,
        last_heard DOUBLE PRECISION NOT NULL,
        catalogs_json TEXT NOT NULL
    );
    CREATE INDEX jobs_owner_created ON jobs (owner, created_at);
    CREATE INDEX jobs_created ON jobs (created_at);
    CREATE INDEX jobs_updated ON jobs (updated_at);
    """,
)
