//! Persistent state: runs, leases (bearers only as SHA-256 hashes) and PAT pool slots.
//!
//! Two backends behind one trait, [`StoreBackend`]:
//!
//! - [`sqlite`]: an embedded file (WAL), the default for `paddock-proxy run` and one-replica
//!   installs;
//! - [`postgres`]: a shared `PostgreSQL` database, so several broker replicas serve one cluster.
//!
//! The trait is synchronous on purpose: the broker's domain service ([`crate::broker`]) runs
//! every operation on tokio's blocking pool (audit writes fsync), so a store call may block.
//! The `PostgreSQL` backend uses the synchronous `postgres` client for the same reason.
//!
//! Invariants both backends keep (the shared suite in `tests.rs` checks them on both):
//!
//! - a pool slot is held by at most one lease: reservations have a primary key on
//!   (pool, slot), and the reservation happens inside the transaction that inserts the lease;
//! - one live lease per run and credential: an issue revokes the previous one in the same
//!   transaction;
//! - nothing is cached: every read goes to the database, so a revocation committed by any
//!   replica is seen by the next lookup on every replica;
//! - each schema change is a numbered migration recorded in a `schema_version` table;
//! - on a shared store, rate-limit buckets live in the database
//!   ([`StoreBackend::take_rate_token`]), so the configured rate holds across replicas.
//!
//! A database that cannot be reached is [`StoreError::Unavailable`]: the server answers 503
//! and the next call tries again (a pooled connection that broke is dropped, not reused).

pub mod postgres;
pub mod sqlite;
#[doc(hidden)]
pub mod testing;
#[cfg(test)]
mod tests;

use std::{fmt, ops::Deref, path::Path, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    ratelimit::RateSpec,
    wire::{DeliveryMode, LeaseInfo, RunInfo},
};

pub use self::{postgres::PostgresStore, sqlite::SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(String),
    /// The database cannot be reached (connection refused, broken, timed out). Fail closed:
    /// callers answer 503 and retry later; nothing is assumed about the state.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("pool {0} has no free slot")]
    PoolExhausted(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database lock poisoned")]
    Poisoned,
    #[error("store configuration: {0}")]
    Config(String),
    /// The database's schema is newer than this binary knows (a downgrade), or older while
    /// migrations were not allowed.
    #[error("schema version {found}, this broker expects {expected}")]
    SchemaVersion { found: i64, expected: i64 },
}

impl StoreError {
    /// Whether the error says the database is out of reach (as opposed to a refusal or a bug).
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A lease to insert.
#[derive(Debug, Clone)]
pub struct NewLease {
    pub lease_id: String,
    pub run: String,
    pub namespace: String,
    pub credential: String,
    pub provider: String,
    pub delivery: DeliveryMode,
    pub bearer_hash: Option<[u8; 32]>,
    pub hosts: Vec<String>,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// A pool to reserve a slot in.
#[derive(Debug, Clone, Copy)]
pub struct PoolRequest<'a> {
    pub pool: &'a str,
    pub size: u32,
}

/// An intermediate CA the broker issued to a node (its certificate's facts, never a key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCaRecord {
    /// Hex serial, as the audit trail and the CRL name it.
    pub serial: String,
    pub node: String,
    pub not_before: u64,
    pub not_after: u64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<u64>,
    pub reason: Option<String>,
}

/// A node barred from new intermediates (`paddock-broker ca revoke --node`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBlock {
    pub node: String,
    pub blocked_at: u64,
    pub reason: String,
}

/// What recording a new intermediate found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCaAdmission {
    /// Recorded: the intermediate may be handed out.
    Recorded,
    /// The node is barred: nothing was recorded and the intermediate must not leave.
    Blocked(NodeBlock),
}

/// The schema version this binary writes and expects (the number of migrations).
pub const SCHEMA_VERSION: i64 = 4;

/// What the broker persists. Every method is one transaction.
pub trait StoreBackend: Send + Sync + fmt::Debug {
    /// `"sqlite"` or `"postgres"` (logs, metrics, `store check`).
    fn kind(&self) -> &'static str;

    /// Whether other broker processes may share this state. A shared store means a
    /// revocation can be committed by another process, which this one's in-memory grant hub
    /// never hears of: the broker then hands out no reusable grants (see ARCHITECTURE.md).
    fn is_shared(&self) -> bool;

    fn upsert_run(&self, run: &RunInfo, now: u64) -> Result<(), StoreError>;

    fn run(&self, run: &str) -> Result<Option<RunInfo>, StoreError>;

    /// Inserts a lease; first revokes the live leases the run already holds for the same
    /// credential (one live lease per run and credential), and reserves a pool slot when
    /// `pool` is given. All in one transaction. Returns the reserved slot.
    fn insert_lease(
        &self,
        lease: &NewLease,
        pool: Option<PoolRequest<'_>>,
        now: u64,
    ) -> Result<Option<u32>, StoreError>;

    /// Removes a lease entirely (used to undo an issue whose audit record failed).
    fn delete_lease(&self, lease_id: &str) -> Result<(), StoreError>;

    fn lease(&self, lease_id: &str) -> Result<Option<LeaseInfo>, StoreError>;

    fn lease_by_bearer_hash(&self, hash: &[u8; 32]) -> Result<Option<LeaseInfo>, StoreError>;

    fn leases_for_run(&self, run: &str) -> Result<Vec<LeaseInfo>, StoreError>;

    fn all_leases(&self) -> Result<Vec<LeaseInfo>, StoreError>;

    fn set_expiry(&self, lease_id: &str, expires_at: u64) -> Result<(), StoreError>;

    /// Revokes a lease and releases its pool slot. Returns false if it was already revoked
    /// (or does not exist): a retried revoke is harmless.
    fn revoke(&self, lease_id: &str) -> Result<bool, StoreError>;

    /// Revokes every live lease of a run; returns the revoked lease ids.
    fn revoke_run(&self, run: &str) -> Result<Vec<String>, StoreError>;

    /// Current reservations of a pool: (slot, lease id), by slot.
    fn pool_reservations(&self, pool: &str) -> Result<Vec<(u32, String)>, StoreError>;

    /// Deletes leases that expired or were revoked before `cutoff` (and their reservations).
    /// Returns how many were removed. Live leases are never touched.
    fn purge_before(&self, cutoff: u64) -> Result<usize, StoreError>;

    /// Takes one token from the shared `kind` bucket of (namespace, run), which refills at
    /// `spec.per_second` up to `spec.burst`. A shared store keeps the bucket in the database
    /// so every replica draws from it: `Ok(Some(true))` took a token, `Ok(Some(false))` found
    /// the bucket empty. `Ok(None)`: this backend keeps no shared buckets (one process), and
    /// the broker's in-memory limiter applies. An error is never "unlimited": the broker
    /// refuses the request (503 when the database is out of reach).
    fn take_rate_token(
        &self,
        namespace: &str,
        run: &str,
        kind: &str,
        spec: RateSpec,
    ) -> Result<Option<bool>, StoreError> {
        let _ = (namespace, run, kind, spec);
        Ok(None)
    }

    /// Hands out the next turn number of an interactive run (1, 2, ...), persisted so it
    /// keeps increasing across broker restarts and replicas. `Ok(None)`: this backend keeps
    /// no sequence and the broker counts in memory.
    fn next_turn_seq(&self, namespace: &str, run: &str) -> Result<Option<u64>, StoreError> {
        let _ = (namespace, run);
        Ok(None)
    }

    /// Records an intermediate about to be handed to its node, unless the node is barred;
    /// the check and the insert are one transaction, serialised per node against
    /// [`StoreBackend::block_node`], so a node barred while its request is signed never gets
    /// an unrevoked intermediate.
    fn record_node_ca(&self, record: &NodeCaRecord) -> Result<NodeCaAdmission, StoreError>;

    /// Revokes one intermediate. `Ok(false)`: no such serial, or already revoked.
    fn revoke_node_ca(&self, serial: &str, now: u64, reason: &str) -> Result<bool, StoreError>;

    /// Bars `node` from new intermediates and revokes every one it holds that has not
    /// expired; returns the revoked serials.
    fn block_node(&self, node: &str, now: u64, reason: &str) -> Result<Vec<String>, StoreError>;

    /// Lifts a bar. `Ok(false)`: the node was not barred.
    fn unblock_node(&self, node: &str) -> Result<bool, StoreError>;

    /// Intermediates that have not expired at `now`, revoked or not, by node then `notAfter`.
    fn node_cas(&self, now: u64) -> Result<Vec<NodeCaRecord>, StoreError>;

    /// Every barred node.
    fn node_blocks(&self) -> Result<Vec<NodeBlock>, StoreError>;

    /// Cheap liveness probe for readiness.
    fn ping(&self) -> Result<(), StoreError>;

    /// The schema version recorded in the database.
    fn schema_version(&self) -> Result<i64, StoreError>;
}

/// Which backend and where, as written under `store:` in `broker.yaml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum StoreConfig {
    Sqlite(SqliteConfig),
    Postgres(postgres::PostgresConfig),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SqliteConfig {
    pub path: std::path::PathBuf,
}

/// The broker's handle on its store: a shared backend.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Arc<dyn StoreBackend>,
}

impl Deref for Store {
    type Target = dyn StoreBackend;

    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

impl Store {
    /// Opens (creating and migrating if needed) the `SQLite` database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::from_backend(SqliteStore::open(path)?))
    }

    pub fn open_in_memory() -> Result<Self, StoreError> {
        Ok(Self::from_backend(SqliteStore::open_in_memory()?))
    }

    /// Opens the configured backend and brings its schema up to date.
    pub fn open_config(config: &StoreConfig) -> Result<Self, StoreError> {
        match config {
            StoreConfig::Sqlite(c) => Self::open(&c.path),
            StoreConfig::Postgres(c) => {
                let store = PostgresStore::connect(c)?;
                store.migrate()?;
                Ok(Self::from_backend(store))
            }
        }
    }

    /// Opens the configured backend as it is, for `paddock-broker store check|migrate`:
    /// nothing is migrated.
    pub fn open_config_unmigrated(config: &StoreConfig) -> Result<Self, StoreError> {
        match config {
            StoreConfig::Sqlite(c) => {
                Ok(Self::from_backend(SqliteStore::open_unmigrated(&c.path)?))
            }
            StoreConfig::Postgres(c) => Ok(Self::from_backend(PostgresStore::connect(c)?)),
        }
    }

    /// Applies pending migrations (creating an absent `SQLite` file); returns the version.
    pub fn migrate_config(config: &StoreConfig) -> Result<i64, StoreError> {
        match config {
            StoreConfig::Sqlite(c) => SqliteStore::open(&c.path)?.migrate(),
            StoreConfig::Postgres(c) => PostgresStore::connect(c)?.migrate(),
        }
    }

    pub fn from_backend(backend: impl StoreBackend + 'static) -> Self {
        Self {
            backend: Arc::new(backend),
        }
    }
}
