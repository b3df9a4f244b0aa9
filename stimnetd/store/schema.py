"""Schema migrations, applied in order; PRAGMA user_version records how far a file got.

Never edit a released migration: append a new one. Each runs in its own transaction.
"""

MIGRATIONS: tuple[str, ...] = (
    # 1: audit chain, jobs, signed-request nonces, privacy ledger, gossip members
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);

    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
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
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        request_id TEXT NOT NULL,
        origin TEXT NOT NULL,           -- 'client' (entry node) or the calling node's name
        payload BLOB NOT NULL,
        signature BLOB NOT NULL,
        signer_cert BLOB NOT NULL,
        script BLOB,
        script_sha256 TEXT NOT NULL DEFAULT '',
        sites_json TEXT NOT NULL DEFAULT '[]',
        result BLOB,
        attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_state ON jobs (state);

    CREATE TABLE nonces (
        nonce TEXT PRIMARY KEY,
        signer TEXT NOT NULL,
        seen_at REAL NOT NULL
    );

    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        job_id TEXT NOT NULL,
        epsilon REAL NOT NULL,
        at REAL NOT NULL,
        UNIQUE (job_id, catalog)
    );
    CREATE INDEX ledger_owner ON ledger (researcher, catalog);

    CREATE TABLE releases (
        job_id TEXT PRIMARY KEY,
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        decision TEXT NOT NULL,
        epsilon REAL,
        cohort_digest TEXT NOT NULL,
        partials BLOB,
        at REAL NOT NULL
    );
    CREATE INDEX releases_owner ON releases (researcher, catalog);

    -- Distinct released cohorts (HMAC'd subject ids), for the overlap guard. Kept once per
    -- (researcher, catalog, digest) and found by size: |A xor B| >= ||A| - |B||, so only
    -- cohorts of similar size can be within k_min of a new one.
    CREATE TABLE cohorts (
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        members_json TEXT NOT NULL,
        PRIMARY KEY (researcher, catalog, digest)
    );
    CREATE INDEX cohorts_size ON cohorts (researcher, catalog, size);

    CREATE TABLE members (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        incarnation INTEGER NOT NULL,
        status TEXT NOT NULL,
        last_heard REAL NOT NULL,
        catalogs_json TEXT NOT NULL
    );

    CREATE TABLE approvals (
        script_sha256 TEXT PRIMARY KEY,
        approved_by TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
    # 2: every nonce insert prunes expired nonces by age; the index keeps that from scanning
    # up to 2 x max_age worth of requests in every transaction.
    # Job listings (newest first, a researcher's own or all) read an index, not every job,
    # and the jobs-by-state gauge reads counts kept by triggers instead of counting them all.
    """
    CREATE INDEX nonces_seen ON nonces (seen_at);
    CREATE INDEX jobs_owner_created ON jobs (owner, created_at);
    CREATE INDEX jobs_created ON jobs (created_at);

    CREATE TABLE job_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL);
    INSERT INTO job_counts (state, n) SELECT state, COUNT(*) FROM jobs GROUP BY state;
    CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (state, n) VALUES (NEW.state, 1)
            ON CONFLICT (state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER job_counts_update AFTER UPDATE OF state ON jobs
    WHEN OLD.state IS NOT NEW.state BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
        INSERT INTO job_counts (state, n) VALUES (NEW.state, 1)
            ON CONFLICT (state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    END;
    """,
    # 3: each cohort's bucket counts (records.cohort_sketch), a lower bound on its distance
    # to another: the overlap guard parses only cohorts that could be within k_min - 1 of a
    # new one, not every cohort of similar size (members are JSON, some 70 bytes a subject).
    # A table of its own: a column after members_json would be read by walking each row's
    # overflow pages. Cohorts stored at an earlier version are sketched the first time the
    # guard loads them.
    """
    CREATE TABLE cohort_sketches (
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        digest TEXT NOT NULL,
        sketch BLOB NOT NULL,
        PRIMARY KEY (researcher, catalog, digest)
    );
    """,
    # 4: the released cells of each distinct grouped query (two or more cells), as digests
    # of their rows in `cohorts` with their sizes: a union of some of one query's cells can
    # be near a union of some of another's (privacy/overlap.py), and sizes alone rule most
    # out without reading members. Grouped releases stored at an earlier version are in
    # `cohorts` cell by cell only, and guarded cell by cell. Jobs are found by when they last
    # changed: finished ones are deleted after `[node] job_retention_days`.
    """
    CREATE INDEX jobs_updated ON jobs (updated_at);
    CREATE TABLE cohort_families (
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        digest TEXT NOT NULL,
        sizes_json TEXT NOT NULL,
        atoms_json TEXT NOT NULL,
        PRIMARY KEY (researcher, catalog, digest)
    );
    """,
    # 5: delta is charged next to epsilon (privacy/threshold.py: a noised query's chance of
    # releasing a cell below k_min); rows charged before this version spent none.
    """
    ALTER TABLE ledger ADD COLUMN delta REAL NOT NULL DEFAULT 0;
    """,
    # 6: exact auditing of linear statistics (privacy/span.py): each cohort a researcher (or,
    # with a shared history, anyone: researcher '*') was given a sum of `quantity` over, by
    # digest; members are in `cohorts`.
    """
    CREATE TABLE linear_cohorts (
        researcher TEXT NOT NULL,
        catalog TEXT NOT NULL,
        quantity TEXT NOT NULL,
        digest TEXT NOT NULL,
        job_id TEXT NOT NULL,
        PRIMARY KEY (researcher, catalog, quantity, digest)
    );
    """,
    # 7: a charge refunded because none of its release's bytes left the site (the entry
    # went away before the partial was handed to the stream: store/releases.refund).
    # Refunded rows are kept, and no longer count against any budget.
    """
    ALTER TABLE ledger ADD COLUMN refunded_at REAL;
    """,
    # 8: how many times a restart put the job back in the queue after it was interrupted
    # mid-run (jobs/recovery.py): a job re-run once and interrupted again is not re-run a
    # third time, so a job that itself brings the node down cannot crash-loop it.
    # Not `attempts`, which marks a job as resumed (its sites return a release it already
    # made) and also counts jobs that were only waiting in the queue at the stop.
    """
    ALTER TABLE jobs ADD COLUMN requeues INTEGER NOT NULL DEFAULT 0;
    """,
)
