//! The `PostgreSQL` backend: state shared by several broker replicas.
//!
//! - Connections come from a small pool of synchronous `postgres` clients (the broker calls
//!   the store from tokio's blocking pool). A connection that broke is dropped, and the next
//!   checkout dials again: the broker recovers from a database outage without a restart.
//! - Issues serialise per (run, credential) and per pool with transaction-scoped advisory
//!   locks, and a pool slot is still guarded by the (pool, slot) primary key, so two replicas
//!   can never hand one slot to two leases.
//! - Nothing is cached: a lease revoked by one replica is refused by every replica's next
//!   lookup.
//! - TLS to the database with rustls (ring), trusting `caFile` (or the web PKI roots without
//!   one). A TCP connection requires TLS unless the URL says `sslmode=disable` (`prefer`, the
//!   default, is taken as `require`: its plaintext fallback is a downgrade anyone on the path
//!   can force); a Unix socket needs none.

use std::{
    collections::HashMap,
    fmt, io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Condvar, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use postgres::{Client, Statement, Transaction, types::ToSql};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::{
    Socket,
    config::{Host, SslMode},
    error::SqlState,
    tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream},
};

use super::{
    NewLease, NodeBlock, NodeCaAdmission, NodeCaRecord, PoolRequest, SCHEMA_VERSION, StoreBackend,
    StoreError, sqlite::delivery_str,
};
use crate::{
    ratelimit::RateSpec,
    wire::{DeliveryMode, LeaseInfo, RunInfo, RunPhase},
};

fn default_pool_size() -> u32 {
    8
}

fn default_timeout() -> f64 {
    5.0
}

/// `store: {postgres: {...}}` in `broker.yaml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresConfig {
    /// A file holding the connection URL or key=value string (it may carry a password, so it
    /// lives in a Secret, not in the config).
    #[serde(alias = "url_file")]
    pub url_file: PathBuf,
    /// PEM CA certificates the server's certificate must chain to.
    #[serde(default, alias = "ca_file")]
    pub ca_file: Option<PathBuf>,
    /// Most connections this replica opens.
    #[serde(default = "default_pool_size", alias = "pool_size")]
    pub pool_size: u32,
    /// Seconds to connect, and to wait for a free pooled connection, before a call fails
    /// with 503.
    #[serde(default = "default_timeout", alias = "timeout_seconds")]
    pub timeout_seconds: f64,
}

const MIGRATION_1: &str = "
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    template TEXT NOT NULL,
    phase TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    run TEXT NOT NULL,
    namespace TEXT NOT NULL,
    credential TEXT NOT NULL,
    provider TEXT NOT NULL,
    delivery TEXT NOT NULL,
    bearer_hash BYTEA UNIQUE,
    hosts TEXT NOT NULL,
    pool_slot INTEGER,
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX IF NOT EXISTS leases_by_run ON leases(run, credential);
CREATE TABLE IF NOT EXISTS pool_slots (
    pool TEXT NOT NULL,
    slot INTEGER NOT NULL,
    lease_id TEXT NOT NULL UNIQUE,
    PRIMARY KEY (pool, slot)
);
";

/// Migration 2: rate-limit token buckets shared by the replicas (see `take_rate_token`).
/// `updated_at` is the database's clock, so replicas' clocks never matter.
const MIGRATION_2: &str = "
CREATE TABLE IF NOT EXISTS rate_buckets (
    namespace TEXT NOT NULL,
    run TEXT NOT NULL,
    kind TEXT NOT NULL,
    tokens DOUBLE PRECISION NOT NULL,
    granted BOOLEAN NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (namespace, run, kind)
);
";

/// Migration 3: the turn sequence of interactive runs (see `next_turn_seq`). Rows stay after
/// a run ends so a number is never handed out twice.
const MIGRATION_3: &str = "
CREATE TABLE IF NOT EXISTS turn_seqs (
    namespace TEXT NOT NULL,
    run TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (namespace, run)
);
";

/// Migration 4: the node intermediates issued (for revocation and the CRL) and the nodes
/// barred from new ones.
const MIGRATION_4: &str = "
CREATE TABLE IF NOT EXISTS node_cas (
    serial TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    revoked_at BIGINT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS node_cas_by_node ON node_cas(node, not_after);
CREATE TABLE IF NOT EXISTS node_blocks (
    node TEXT PRIMARY KEY,
    blocked_at BIGINT NOT NULL,
    reason TEXT NOT NULL
);
";

/// Every migration, in order; the schema version is the number applied.
const MIGRATIONS: &[&str] = &[MIGRATION_1, MIGRATION_2, MIGRATION_3, MIGRATION_4];

/// Serialises issuing and barring per node across replicas (with the node's name hashed in).
const NODE_CA_LOCK: i32 = 0x7064_6b6e; // "pdkn"

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}")))
}

fn node_block_from_row(row: &postgres::Row) -> Result<NodeBlock, StoreError> {
    Ok(NodeBlock {
        node: row.try_get(0)?,
        blocked_at: to_u64(row.try_get(1)?, "blocked_at")?,
        reason: row.try_get(2)?,
    })
}

/// Takes the per-node lock for the rest of `tx`.
fn lock_node(tx: &mut Transaction<'_>, node: &str) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&NODE_CA_LOCK, &node],
    )?;
    Ok(())
}

/// One token from a shared bucket, in one statement: the row lock `ON CONFLICT DO UPDATE`
/// takes serialises replicas on the bucket, the refill is computed from the stored time and
/// the database's `now()`, and a token is taken only when a whole one is there. A new bucket
/// starts full (burst, less the token taken). `now()` is the transaction's start: a
/// statement that waited for the row lock may see a `now()` older than the stored time; the
/// refill is then zero and the stored time never moves back, so a race can only cost
/// tokens, never add them. `$4` burst, `$5` tokens per second.
const TAKE_RATE_TOKEN: &str = "
INSERT INTO rate_buckets AS b (namespace, run, kind, tokens, granted, updated_at)
VALUES ($1, $2, $3, $4::float8 - 1, TRUE, now())
ON CONFLICT (namespace, run, kind) DO UPDATE SET
    tokens = LEAST($4::float8, b.tokens + $5::float8 * GREATEST(0, EXTRACT(EPOCH FROM now() - b.updated_at)::float8))
        - CASE WHEN LEAST($4::float8, b.tokens + $5::float8 * GREATEST(0, EXTRACT(EPOCH FROM now() - b.updated_at)::float8)) >= 1 THEN 1 ELSE 0 END,
    granted = LEAST($4::float8, b.tokens + $5::float8 * GREATEST(0, EXTRACT(EPOCH FROM now() - b.updated_at)::float8)) >= 1,
    updated_at = GREATEST(b.updated_at, now())
RETURNING granted
";

/// The advisory lock migrations take, so replicas starting together migrate one at a time.
const MIGRATION_LOCK: i64 = 0x7064_6b5f_6d69_6772; // "pdk_migr"

/// Whether a client error means "the database is out of reach" rather than a refusal.
fn unavailable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        return c.starts_with("08")
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::TOO_MANY_CONNECTIONS
            || *code == SqlState::QUERY_CANCELED
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION;
    }
    // No SQLSTATE: an I/O error or a timeout on the way to the server.
    std::error::Error::source(e).is_some_and(<dyn std::error::Error>::is::<io::Error>)
        || e.to_string().contains("timeout")
}

fn map_err(e: &postgres::Error) -> StoreError {
    // The client's own Display of a server error is only "db error": name the SQLSTATE and
    // the server's message (never a parameter value: the server does not echo them here).
    let text = match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    if unavailable(e) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Postgres(text)
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        map_err(&e)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One pooled connection and its prepared statements (the hot lookups skip a parse round trip).
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    fn statement(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

/// Idle connections and how many exist in all.
struct PoolState {
    idle: Vec<Conn>,
    open: u32,
}

pub struct PostgresStore {
    config: postgres::Config,
    tls: RustlsConnect,
    size: u32,
    timeout: Duration,
    state: Mutex<PoolState>,
    freed: Condvar,
    /// Where the URL came from (never the URL: it may hold a password).
    origin: String,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.origin)
            .field("pool_size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Closing a synchronous client blocks on its own runtime: off any async worker.
        let idle = self
            .state
            .get_mut()
            .map(|s| std::mem::take(&mut s.idle))
            .unwrap_or_default();
        off_the_runtime(move || drop(idle));
    }
}

/// A checked-out connection; it goes back to the pool on drop unless it broke.
struct Pooled<'a> {
    pool: &'a PostgresStore,
    conn: Option<Conn>,
}

impl Pooled<'_> {
    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("present until drop")
    }

    /// Runs `f` and drops the connection when the database became unreachable on it.
    fn run<T>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let out = f(self.conn());
        if let Err(StoreError::Unavailable(_)) = &out
            && let Some(conn) = self.conn.take()
        {
            drop(conn);
            self.pool.release(None);
        }
        out
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let keep = (!conn.client.is_closed()).then_some(conn);
            self.pool.release(keep);
        }
    }
}

impl PostgresStore {
    /// Reads the URL file and connects once (so a wrong URL or an unreachable server shows up
    /// at start-up), without migrating.
    pub fn connect(config: &PostgresConfig) -> Result<Self, StoreError> {
        let url = std::fs::read_to_string(&config.url_file).map_err(|e| {
            StoreError::Config(format!("reading {}: {e}", config.url_file.display()))
        })?;
        let store = Self::connect_url(
            url.trim(),
            config.ca_file.as_deref(),
            config.pool_size,
            Duration::try_from_secs_f64(config.timeout_seconds)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| StoreError::Config("timeoutSeconds must be positive".into()))?,
        )?;
        let mut store = store;
        store.origin = config.url_file.display().to_string();
        Ok(store)
    }

    /// Connects to `url` (a libpq URL or key=value string).
    pub fn connect_url(
        url: &str,
        ca_file: Option<&Path>,
        pool_size: u32,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        if pool_size == 0 {
            return Err(StoreError::Config("poolSize must be at least 1".into()));
        }
        let pg = connection_config(url, timeout)?;
        let tls = RustlsConnect::new(ca_file)?;
        let store = Self {
            config: postgres::Config::from(pg),
            tls,
            size: pool_size,
            timeout,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            origin: "the configured URL".to_owned(),
        };
        store.with(|_| Ok(()))?;
        Ok(store)
    }

    fn dial(&self) -> Result<Conn, StoreError> {
        let mut client = self
            .config
            .connect(self.tls.clone())
            .map_err(|e| StoreError::Unavailable(format!("connecting to PostgreSQL: {e}")))?;
        // A server that stops answering mid-statement must not hold a broker thread forever.
        let ms = self.timeout.as_millis().saturating_mul(2);
        client.batch_execute(&format!(
            "SET statement_timeout = {ms}; SET lock_timeout = {ms}"
        ))?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    fn get(&self) -> Result<Pooled<'_>, StoreError> {
        let deadline = std::time::Instant::now() + self.timeout;
        let mut state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
        loop {
            if let Some(conn) = state.idle.pop() {
                if conn.client.is_closed() {
                    state.open -= 1;
                    continue;
                }
                return Ok(Pooled {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if state.open < self.size {
                state.open += 1;
                drop(state);
                return match self.dial() {
                    Ok(conn) => Ok(Pooled {
                        pool: self,
                        conn: Some(conn),
                    }),
                    Err(e) => {
                        self.release(None);
                        Err(e)
                    }
                };
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::Unavailable(format!(
                    "all {} database connections busy for {:?}",
                    self.size, self.timeout
                )));
            }
            state = self
                .freed
                .wait_timeout(state, left)
                .map_err(|_| StoreError::Poisoned)?
                .0;
        }
    }

    /// Gives a connection back (`None`: it is gone, a new one may be dialled).
    fn release(&self, conn: Option<Conn>) {
        if let Ok(mut state) = self.state.lock() {
            match conn {
                Some(conn) => state.idle.push(conn),
                None => state.open = state.open.saturating_sub(1),
            }
        }
        self.freed.notify_one();
    }

    fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        off_the_runtime(|| self.get()?.run(f))
    }

    fn transaction<T: Send>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        self.with(|c| {
            let mut tx = c.client.transaction()?;
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Applies the migrations the database has not seen, under an advisory lock (replicas
    /// that start together migrate one after the other). A newer schema is refused.
    pub fn migrate(&self) -> Result<i64, StoreError> {
        self.transaction(|tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, \
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )?;
            let found: i64 = tx
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?
                .get(0);
            if found > SCHEMA_VERSION {
                return Err(StoreError::SchemaVersion {
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
            for (n, sql) in (1_i64..)
                .zip(MIGRATIONS.iter())
                .skip(usize::try_from(found).unwrap_or(0))
            {
                tx.batch_execute(sql)?;
                tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&n])?;
            }
            Ok(SCHEMA_VERSION)
        })
    }

    fn query_leases(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<LeaseInfo>, StoreError> {
        self.with(|c| {
            let st = c.statement(sql)?;
            c.client
                .query(&st, params)?
                .iter()
                .map(lease_from_row)
                .collect()
        })
    }
}

/// Runs `f`, which blocks on the synchronous client, where blocking is allowed. The broker
/// calls the store from tokio's blocking pool, where `f` runs as it is; a call from an async
/// worker (an authenticator resolving a run) steps out of the runtime first, and on a
/// current-thread runtime `f` gets a thread of its own (the client's `block_on` would panic
/// inside a runtime).
fn off_the_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Err(_) => f(),
        Ok(RuntimeFlavor::CurrentThread) => std::thread::scope(|s| {
            s.spawn(f)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }),
        Ok(_) => tokio::task::block_in_place(f),
    }
}

fn lease_from_row(row: &postgres::Row) -> Result<LeaseInfo, StoreError> {
    let lease_id: String = row.try_get("lease_id")?;
    let corrupt = |what: &str| StoreError::Corrupt(format!("lease {lease_id}: {what}"));
    let delivery: String = row.try_get("delivery")?;
    let hosts: String = row.try_get("hosts")?;
    let slot: Option<i32> = row.try_get("pool_slot")?;
    let issued_at: i64 = row.try_get("issued_at")?;
    let expires_at: i64 = row.try_get("expires_at")?;
    Ok(LeaseInfo {
        run: row.try_get("run")?,
        namespace: row.try_get("namespace")?,
        credential: row.try_get("credential")?,
        provider: row.try_get("provider")?,
        delivery: match delivery.as_str() {
            "proxy-injected" => DeliveryMode::ProxyInjected,
            "in-container" => DeliveryMode::InContainer,
            _ => return Err(corrupt("delivery")),
        },
        hosts: serde_json::from_str(&hosts).map_err(|_| corrupt("hosts"))?,
        pool_slot: slot
            .map(u32::try_from)
            .transpose()
            .map_err(|_| corrupt("pool_slot"))?,
        issued_at: u64::try_from(issued_at).map_err(|_| corrupt("issued_at"))?,
        expires_at: u64::try_from(expires_at).map_err(|_| corrupt("expires_at"))?,
        revoked: row.try_get("revoked")?,
        lease_id,
    })
}

const SELECT_LEASE: &str = "SELECT lease_id, run, namespace, credential, provider, delivery, \
     bearer_hash, hosts, pool_slot, issued_at, expires_at, revoked FROM leases WHERE lease_id = $1";
const SELECT_BY_HASH: &str = "SELECT lease_id, run, namespace, credential, provider, delivery, \
     bearer_hash, hosts, pool_slot, issued_at, expires_at, revoked FROM leases WHERE bearer_hash = $1";
const SELECT_RUN_LEASES: &str = "SELECT lease_id, run, namespace, credential, provider, delivery, \
     bearer_hash, hosts, pool_slot, issued_at, expires_at, revoked FROM leases WHERE run = $1 \
     ORDER BY issued_at, lease_id";
const SELECT_ALL_LEASES: &str = "SELECT lease_id, run, namespace, credential, provider, delivery, \
     bearer_hash, hosts, pool_slot, issued_at, expires_at, revoked FROM leases \
     ORDER BY issued_at, lease_id";
const SELECT_RUN: &str = "SELECT run, namespace, template, phase FROM runs WHERE run = $1";

impl StoreBackend for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn upsert_run(&self, run: &RunInfo, now: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.client.execute(
                "INSERT INTO runs (run, namespace, template, phase, updated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (run) DO UPDATE SET namespace = excluded.namespace, template = excluded.template,
                 phase = excluded.phase, updated_at = excluded.updated_at",
                &[&run.run, &run.namespace, &run.template, &run.phase.as_str(), &to_i64(now)],
            )?;
            Ok(())
        })
    }

    fn run(&self, run: &str) -> Result<Option<RunInfo>, StoreError> {
        self.with(|c| {
            let st = c.statement(SELECT_RUN)?;
            let Some(row) = c.client.query_opt(&st, &[&run])? else {
                return Ok(None);
            };
            let run: String = row.try_get(0)?;
            let phase: String = row.try_get(3)?;
            let phase = RunPhase::parse(&phase)
                .ok_or_else(|| StoreError::Corrupt(format!("run {run}: phase")))?;
            Ok(Some(RunInfo {
                run,
                namespace: row.try_get(1)?,
                template: row.try_get(2)?,
                phase,
            }))
        })
    }

    fn insert_lease(
        &self,
        lease: &NewLease,
        pool: Option<PoolRequest<'_>>,
        now: u64,
    ) -> Result<Option<u32>, StoreError> {
        let hosts =
            serde_json::to_string(&lease.hosts).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.transaction(|tx| {
            // Lock order: (run, credential) first, then the pool. Every issue takes them in
            // this order, so two issues cannot wait on each other.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
                &[&lease.run, &lease.credential],
            )?;
            let previous: Vec<String> = tx
                .query(
                    "UPDATE leases SET revoked = TRUE WHERE run = $1 AND credential = $2 AND NOT revoked
                     RETURNING lease_id",
                    &[&lease.run, &lease.credential],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if !previous.is_empty() {
                tx.execute(
                    "DELETE FROM pool_slots WHERE lease_id = ANY($1)",
                    &[&previous],
                )?;
            }
            let slot = match pool {
                None => None,
                Some(p) => {
                    tx.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended('pool:' || $1, 0))",
                        &[&p.pool],
                    )?;
                    // Reservations of dead leases are released lazily here.
                    tx.execute(
                        "DELETE FROM pool_slots WHERE pool = $1 AND lease_id IN
                         (SELECT lease_id FROM leases WHERE revoked OR expires_at <= $2)",
                        &[&p.pool, &to_i64(now)],
                    )?;
                    let size = i32::try_from(p.size).unwrap_or(i32::MAX);
                    let row = tx.query_opt(
                        "INSERT INTO pool_slots (pool, slot, lease_id)
                         SELECT $1, s, $2 FROM generate_series(0, $3 - 1) AS s
                         WHERE NOT EXISTS (SELECT 1 FROM pool_slots WHERE pool = $1 AND slot = s)
                         ORDER BY s LIMIT 1
                         RETURNING slot",
                        &[&p.pool, &lease.lease_id, &size],
                    )?;
                    let Some(row) = row else {
                        return Err(StoreError::PoolExhausted(p.pool.to_owned()));
                    };
                    let slot: i32 = row.try_get(0)?;
                    Some(
                        u32::try_from(slot).map_err(|_| StoreError::Corrupt("slot".into()))?,
                    )
                }
            };
            let slot_param = slot.map(|s| i32::try_from(s).unwrap_or(i32::MAX));
            let hash = lease.bearer_hash.map(|h| h.to_vec());
            tx.execute(
                "INSERT INTO leases (lease_id, run, namespace, credential, provider, delivery, bearer_hash,
                 hosts, pool_slot, issued_at, expires_at, revoked)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, FALSE)",
                &[
                    &lease.lease_id,
                    &lease.run,
                    &lease.namespace,
                    &lease.credential,
                    &lease.provider,
                    &delivery_str(lease.delivery),
                    &hash,
                    &hosts,
                    &slot_param,
                    &to_i64(lease.issued_at),
                    &to_i64(lease.expires_at),
                ],
            )?;
            Ok(slot)
        })
    }

    fn delete_lease(&self, lease_id: &str) -> Result<(), StoreError> {
        self.transaction(|tx| {
            tx.execute("DELETE FROM pool_slots WHERE lease_id = $1", &[&lease_id])?;
            tx.execute("DELETE FROM leases WHERE lease_id = $1", &[&lease_id])?;
            Ok(())
        })
    }

    fn lease(&self, lease_id: &str) -> Result<Option<LeaseInfo>, StoreError> {
        Ok(self
            .query_leases(SELECT_LEASE, &[&lease_id])?
            .into_iter()
            .next())
    }

    fn lease_by_bearer_hash(&self, hash: &[u8; 32]) -> Result<Option<LeaseInfo>, StoreError> {
        let hash: &[u8] = hash;
        Ok(self
            .query_leases(SELECT_BY_HASH, &[&hash])?
            .into_iter()
            .next())
    }

    fn leases_for_run(&self, run: &str) -> Result<Vec<LeaseInfo>, StoreError> {
        self.query_leases(SELECT_RUN_LEASES, &[&run])
    }

    fn all_leases(&self) -> Result<Vec<LeaseInfo>, StoreError> {
        self.query_leases(SELECT_ALL_LEASES, &[])
    }

    fn set_expiry(&self, lease_id: &str, expires_at: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.client.execute(
                "UPDATE leases SET expires_at = $2 WHERE lease_id = $1",
                &[&lease_id, &to_i64(expires_at)],
            )?;
            Ok(())
        })
    }

    fn revoke(&self, lease_id: &str) -> Result<bool, StoreError> {
        self.transaction(|tx| {
            let n = tx.execute(
                "UPDATE leases SET revoked = TRUE WHERE lease_id = $1 AND NOT revoked",
                &[&lease_id],
            )?;
            tx.execute("DELETE FROM pool_slots WHERE lease_id = $1", &[&lease_id])?;
            Ok(n > 0)
        })
    }

    fn revoke_run(&self, run: &str) -> Result<Vec<String>, StoreError> {
        self.transaction(|tx| {
            let ids: Vec<String> = tx
                .query(
                    "UPDATE leases SET revoked = TRUE WHERE run = $1 AND NOT revoked RETURNING lease_id",
                    &[&run],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            tx.execute("DELETE FROM pool_slots WHERE lease_id = ANY($1)", &[&ids])?;
            Ok(ids)
        })
    }

    fn pool_reservations(&self, pool: &str) -> Result<Vec<(u32, String)>, StoreError> {
        self.with(|c| {
            c.client
                .query(
                    "SELECT slot, lease_id FROM pool_slots WHERE pool = $1 ORDER BY slot",
                    &[&pool],
                )?
                .iter()
                .map(|r| {
                    let slot: i32 = r.try_get(0)?;
                    Ok((
                        u32::try_from(slot).map_err(|_| StoreError::Corrupt("slot".into()))?,
                        r.try_get(1)?,
                    ))
                })
                .collect()
        })
    }

    fn purge_before(&self, cutoff: u64) -> Result<usize, StoreError> {
        self.transaction(|tx| {
            let cutoff = to_i64(cutoff);
            tx.execute(
                "DELETE FROM pool_slots WHERE lease_id IN
                 (SELECT lease_id FROM leases WHERE expires_at < $1 OR (revoked AND issued_at < $1))",
                &[&cutoff],
            )?;
            let n = tx.execute(
                "DELETE FROM leases WHERE expires_at < $1 OR (revoked AND issued_at < $1)",
                &[&cutoff],
            )?;
            // An expired intermediate needs no revocation entry: chains through it fail anyway.
            tx.execute("DELETE FROM node_cas WHERE not_after < $1", &[&cutoff])?;
            // A bucket untouched since before the cut-off has refilled long ago: dropping it
            // (a new one starts full) changes nothing but the table's size.
            tx.execute(
                "DELETE FROM rate_buckets WHERE updated_at < to_timestamp($1::bigint)",
                &[&cutoff],
            )?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn take_rate_token(
        &self,
        namespace: &str,
        run: &str,
        kind: &str,
        spec: RateSpec,
    ) -> Result<Option<bool>, StoreError> {
        let burst = f64::from(spec.burst.max(1));
        let per_second = f64::from(spec.per_second);
        self.with(|c| {
            let stmt = c.statement(TAKE_RATE_TOKEN)?;
            let row = c
                .client
                .query_one(&stmt, &[&namespace, &run, &kind, &burst, &per_second])?;
            Ok(Some(row.try_get::<_, bool>(0)?))
        })
    }

    /// One statement: the row lock of `ON CONFLICT DO UPDATE` orders concurrent replicas.
    fn record_node_ca(&self, record: &NodeCaRecord) -> Result<NodeCaAdmission, StoreError> {
        self.transaction(|tx| {
            // The same lock `block_node` takes: a bar is either committed before this check
            // or waits for this insert and then revokes it.
            lock_node(tx, &record.node)?;
            if let Some(row) = tx.query_opt(
                "SELECT node, blocked_at, reason FROM node_blocks WHERE node = $1",
                &[&record.node],
            )? {
                return Ok(NodeCaAdmission::Blocked(node_block_from_row(&row)?));
            }
            tx.execute(
                "INSERT INTO node_cas (serial, node, not_before, not_after) VALUES ($1, $2, $3, $4)",
                &[
                    &record.serial,
                    &record.node,
                    &to_i64(record.not_before),
                    &to_i64(record.not_after),
                ],
            )?;
            Ok(NodeCaAdmission::Recorded)
        })
    }

    fn revoke_node_ca(&self, serial: &str, now: u64, reason: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.client.execute(
                "UPDATE node_cas SET revoked_at = $2, reason = $3 WHERE serial = $1 AND revoked_at IS NULL",
                &[&serial, &to_i64(now), &reason],
            )?;
            Ok(n > 0)
        })
    }

    fn block_node(&self, node: &str, now: u64, reason: &str) -> Result<Vec<String>, StoreError> {
        self.transaction(|tx| {
            lock_node(tx, node)?;
            tx.execute(
                "INSERT INTO node_blocks (node, blocked_at, reason) VALUES ($1, $2, $3)
                 ON CONFLICT (node) DO UPDATE SET blocked_at = excluded.blocked_at, reason = excluded.reason",
                &[&node, &to_i64(now), &reason],
            )?;
            tx.query(
                "UPDATE node_cas SET revoked_at = $2, reason = $3
                 WHERE node = $1 AND revoked_at IS NULL AND not_after > $2 RETURNING serial",
                &[&node, &to_i64(now), &reason],
            )?
            .iter()
            .map(|r| r.try_get(0).map_err(StoreError::from))
            .collect()
        })
    }

    fn unblock_node(&self, node: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.client
                .execute("DELETE FROM node_blocks WHERE node = $1", &[&node])?
                > 0)
        })
    }

    fn node_cas(&self, now: u64) -> Result<Vec<NodeCaRecord>, StoreError> {
        self.with(|c| {
            c.client
                .query(
                    "SELECT serial, node, not_before, not_after, revoked_at, reason FROM node_cas
                     WHERE not_after > $1 ORDER BY node, not_after, serial",
                    &[&to_i64(now)],
                )?
                .iter()
                .map(|r| {
                    Ok(NodeCaRecord {
                        serial: r.try_get(0)?,
                        node: r.try_get(1)?,
                        not_before: to_u64(r.try_get(2)?, "not_before")?,
                        not_after: to_u64(r.try_get(3)?, "not_after")?,
                        revoked_at: r
                            .try_get::<_, Option<i64>>(4)?
                            .map(|v| to_u64(v, "revoked_at"))
                            .transpose()?,
                        reason: r.try_get(5)?,
                    })
                })
                .collect()
        })
    }

    fn node_blocks(&self) -> Result<Vec<NodeBlock>, StoreError> {
        self.with(|c| {
            c.client
                .query(
                    "SELECT node, blocked_at, reason FROM node_blocks ORDER BY node",
                    &[],
                )?
                .iter()
                .map(node_block_from_row)
                .collect()
        })
    }

    fn next_turn_seq(&self, namespace: &str, run: &str) -> Result<Option<u64>, StoreError> {
        self.with(|c| {
            let row = c.client.query_one(
                "INSERT INTO turn_seqs (namespace, run, seq) VALUES ($1, $2, 1) \
                 ON CONFLICT (namespace, run) DO UPDATE SET seq = turn_seqs.seq + 1 RETURNING seq",
                &[&namespace, &run],
            )?;
            let seq: i64 = row.try_get(0)?;
            u64::try_from(seq)
                .map(Some)
                .map_err(|_| StoreError::Corrupt(format!("negative turn sequence {seq}")))
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| {
            c.client.batch_execute("SELECT 1")?;
            Ok(())
        })
    }

    fn schema_version(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            let exists: bool = c
                .client
                .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?
                .get(0);
            if !exists {
                return Ok(0);
            }
            Ok(c.client
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?
                .get(0))
        })
    }
}

/// tokio-postgres's TLS hook on rustls (ring; the workspace's provider).
#[derive(Clone)]
struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

impl RustlsConnect {
    fn new(ca_file: Option<&Path>) -> Result<Self, StoreError> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                use rustls_pki_types::pem::PemObject;
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|e| StoreError::Config(format!("caFile {}: {e}", path.display())))?;
                for cert in certs {
                    let cert = cert.map_err(|e| {
                        StoreError::Config(format!("caFile {}: {e}", path.display()))
                    })?;
                    roots.add(cert).map_err(|e| {
                        StoreError::Config(format!("caFile {}: {e}", path.display()))
                    })?;
                }
                if roots.is_empty() {
                    return Err(StoreError::Config(format!(
                        "caFile {} holds no certificate",
                        path.display()
                    )));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnectOne, io::Error> {
        // Called for a Unix socket too (with ""), where no handshake follows: a name that
        // does not parse only fails a handshake that is actually attempted.
        let name = rustls_pki_types::ServerName::try_from(domain.to_owned()).ok();
        Ok(RustlsConnectOne {
            config: self.config.clone(),
            name,
        })
    }
}

struct RustlsConnectOne {
    config: Arc<rustls::ClientConfig>,
    name: Option<rustls_pki_types::ServerName<'static>>,
}

impl TlsConnect<Socket> for RustlsConnectOne {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let name = self.name.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the database host is not a valid TLS server name",
                )
            })?;
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// The client configuration for `url`: TLS required over TCP unless the URL says
/// `sslmode=disable` (warned about), none over a Unix socket, and the timeouts.
fn connection_config(url: &str, timeout: Duration) -> Result<tokio_postgres::Config, StoreError> {
    // Not echoed: a parse error could quote the URL, password included.
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|_| StoreError::Config("the database URL does not parse".into()))?;
    let tcp = pg.get_hosts().iter().any(|h| matches!(h, Host::Tcp(_)));
    if !tcp {
        // Like libpq: no TLS over a Unix socket (local, and the server offers none).
        pg.ssl_mode(SslMode::Disable);
    } else if pg.get_ssl_mode() == SslMode::Prefer {
        // `prefer` (also the default when the URL names no `sslmode`) falls back to plaintext
        // when the server offers no TLS, which anyone on the path can arrange: require it.
        pg.ssl_mode(SslMode::Require);
    }
    if tcp && pg.get_ssl_mode() == SslMode::Disable {
        tracing::warn!("the PostgreSQL URL sets sslmode=disable: the connection is not encrypted");
    }
    pg.connect_timeout(timeout);
    pg.tcp_user_timeout(timeout.saturating_mul(2));
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    if pg.get_application_name().is_none() {
        pg.application_name("paddock-broker");
    }
    Ok(pg)
}

/// A TLS connection to the database.
struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // No SCRAM channel binding: the certificate is verified against caFile instead.
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> SslMode {
        connection_config(url, Duration::from_secs(1))
            .expect("parses")
            .get_ssl_mode()
    }

    #[test]
    fn tls_is_required_over_tcp_unless_disabled_by_name() {
        assert_eq!(mode("postgresql://u:p@db.example:5432/x"), SslMode::Require);
        // `prefer` can be downgraded by anyone on the path.
        assert_eq!(
            mode("postgresql://u:p@db.example/x?sslmode=prefer"),
            SslMode::Require
        );
        // A password that happens to spell the option changes nothing.
        assert_eq!(
            mode("postgresql://u:sslmode@db.example/x"),
            SslMode::Require
        );
        assert_eq!(
            mode("host=db.example user=u password=sslmode"),
            SslMode::Require
        );
        // Only an explicit `disable` (warned about) goes without.
        assert_eq!(
            mode("postgresql://u:p@db.example/x?sslmode=disable"),
            SslMode::Disable
        );
        // A Unix socket has no TLS.
        assert_eq!(mode("host=/run/postgresql user=u"), SslMode::Disable);
        assert!(connection_config("postgresql://[", Duration::from_secs(1)).is_err());
    }
}
