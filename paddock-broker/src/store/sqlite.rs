//! The `SQLite` backend (WAL): one file, one process.
//!
//! Pool reservations live in their own table with a primary key on (pool, slot): a slot can
//! never be held by two leases, across restarts included.

use std::{path::Path, sync::Mutex};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    NewLease, NodeBlock, NodeCaAdmission, NodeCaRecord, PoolRequest, SCHEMA_VERSION, StoreBackend,
    StoreError,
};
use crate::wire::{DeliveryMode, LeaseInfo, RunInfo, RunPhase};

#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

/// Migration 1: the schema before versioning. `IF NOT EXISTS` throughout, so a database
/// written before the `schema_version` table existed migrates in place.
const MIGRATION_1: &str = "
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    template TEXT NOT NULL,
    phase TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    run TEXT NOT NULL,
    namespace TEXT NOT NULL,
    credential TEXT NOT NULL,
    provider TEXT NOT NULL,
    delivery TEXT NOT NULL,
    bearer_hash BLOB UNIQUE,
    hosts TEXT NOT NULL,
    pool_slot INTEGER,
    issued_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS leases_by_run ON leases(run, credential);
CREATE TABLE IF NOT EXISTS pool_slots (
    pool TEXT NOT NULL,
    slot INTEGER NOT NULL,
    lease_id TEXT NOT NULL UNIQUE,
    PRIMARY KEY (pool, slot)
);
";

/// Migration 2: the `PostgreSQL` backend's shared rate-limit buckets, created here too so both
/// backends keep one schema and one version number. The `SQLite` broker is one process and
/// keeps its buckets in memory (`take_rate_token` is the trait's "not shared"), so the table
/// stays empty.
const MIGRATION_2: &str = "
CREATE TABLE IF NOT EXISTS rate_buckets (
    namespace TEXT NOT NULL,
    run TEXT NOT NULL,
    kind TEXT NOT NULL,
    tokens REAL NOT NULL,
    granted INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, run, kind)
);
";

/// Migration 3: the turn sequence of interactive runs (see `next_turn_seq`). Rows stay after
/// a run ends so a number is never handed out twice.
const MIGRATION_3: &str = "
CREATE TABLE IF NOT EXISTS turn_seqs (
    namespace TEXT NOT NULL,
    run TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (namespace, run)
);
";

/// Migration 4: the node intermediates issued (for revocation and the CRL) and the nodes
/// barred from new ones.
const MIGRATION_4: &str = "
CREATE TABLE IF NOT EXISTS node_cas (
    serial TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    revoked_at INTEGER,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS node_cas_by_node ON node_cas(node, not_after);
CREATE TABLE IF NOT EXISTS node_blocks (
    node TEXT PRIMARY KEY,
    blocked_at INTEGER NOT NULL,
    reason TEXT NOT NULL
);
";

/// Every migration, in order; the schema version is the number applied.
const MIGRATIONS: &[&str] = &[MIGRATION_1, MIGRATION_2, MIGRATION_3, MIGRATION_4];

pub(super) fn delivery_str(d: DeliveryMode) -> &'static str {
    match d {
        DeliveryMode::ProxyInjected => "proxy-injected",
        DeliveryMode::InContainer => "in-container",
    }
}

fn lease_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<LeaseInfo, StoreError>> {
    let hosts: String = row.get("hosts")?;
    let delivery: String = row.get("delivery")?;
    let slot: Option<i64> = row.get("pool_slot")?;
    let issued_at: i64 = row.get("issued_at")?;
    let expires_at: i64 = row.get("expires_at")?;
    let lease_id: String = row.get("lease_id")?;
    let build = || -> Result<LeaseInfo, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("lease {lease_id}: {what}"));
        Ok(LeaseInfo {
            lease_id: lease_id.clone(),
            run: row.get("run")?,
            namespace: row.get("namespace")?,
            credential: row.get("credential")?,
            provider: row.get("provider")?,
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
            revoked: row.get::<_, i64>("revoked")? != 0,
        })
    };
    Ok(build())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}")))
}

fn node_block_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, i64, String)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

fn node_block(c: &Connection, node: &str) -> Result<Option<NodeBlock>, StoreError> {
    let row = c
        .prepare_cached("SELECT node, blocked_at, reason FROM node_blocks WHERE node = ?1")?
        .query_row([node], node_block_from_row)
        .optional()?;
    row.map(|(node, at, reason)| {
        Ok(NodeBlock {
            node,
            blocked_at: to_u64(at, "blocked_at")?,
            reason,
        })
    })
    .transpose()
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database at `path`, owner-only permissions.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        restrict_permissions(path);
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    /// Opens an existing database as it is, without migrating (`paddock-broker store check`).
    pub fn open_unmigrated(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Config(format!(
                "database {} does not exist",
                path.display()
            )));
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// Applies pending migrations; returns the schema version.
    pub fn migrate(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            migrate(c)?;
            current_version(c)
        })
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL for concurrent readers; FULL sync so a reservation acknowledged to a caller
        // survives a crash (a lost reservation could hand one PAT to two runs).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut conn)
    }

    fn query_leases(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<LeaseInfo>, StoreError> {
        self.with(|c| {
            // Cached: the lookups run on every substitution; parsing the SQL each time was
            // the broker's largest single cost per request.
            let mut stmt = c.prepare_cached(sql)?;
            let rows = stmt.query_map(p, lease_from_row)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row??);
            }
            Ok(out)
        })
    }
}

impl StoreBackend for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn is_shared(&self) -> bool {
        false
    }

    fn upsert_run(&self, run: &RunInfo, now: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (run, namespace, template, phase, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(run) DO UPDATE SET namespace = excluded.namespace, template = excluded.template,
                 phase = excluded.phase, updated_at = excluded.updated_at",
                params![run.run, run.namespace, run.template, run.phase.as_str(), to_i64(now)],
            )?;
            Ok(())
        })
    }

    fn run(&self, run: &str) -> Result<Option<RunInfo>, StoreError> {
        self.with(|c| {
            let row = c
                .prepare_cached("SELECT run, namespace, template, phase FROM runs WHERE run = ?1")?
                .query_row([run], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .optional()?;
            row.map(|(run, namespace, template, phase)| {
                let phase = RunPhase::parse(&phase)
                    .ok_or_else(|| StoreError::Corrupt(format!("run {run}: phase")))?;
                Ok(RunInfo {
                    run,
                    namespace,
                    template,
                    phase,
                })
            })
            .transpose()
        })
    }

    /// Inserts a lease; first revokes the live leases the run already holds for the same
    /// credential (one live lease per run and credential), and reserves a pool slot when
    /// `pool` is given. All in one transaction. Returns the reserved slot.
    fn insert_lease(
        &self,
        lease: &NewLease,
        pool: Option<PoolRequest<'_>>,
        now: u64,
    ) -> Result<Option<u32>, StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let previous: Vec<String> = {
                let mut stmt = tx.prepare(
                    "SELECT lease_id FROM leases WHERE run = ?1 AND credential = ?2 AND revoked = 0",
                )?;
                stmt.query_map(params![lease.run, lease.credential], |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            for id in &previous {
                tx.execute("UPDATE leases SET revoked = 1 WHERE lease_id = ?1", [id])?;
                tx.execute("DELETE FROM pool_slots WHERE lease_id = ?1", [id])?;
            }
            let slot = match pool {
                None => None,
                Some(p) => {
                    // Reservations of dead leases are released lazily here.
                    tx.execute(
                        "DELETE FROM pool_slots WHERE pool = ?1 AND lease_id IN
                         (SELECT lease_id FROM leases WHERE revoked = 1 OR expires_at <= ?2)",
                        params![p.pool, to_i64(now)],
                    )?;
                    let taken: Vec<i64> = {
                        let mut stmt = tx.prepare("SELECT slot FROM pool_slots WHERE pool = ?1")?;
                        stmt.query_map([p.pool], |r| r.get(0))?.collect::<Result<_, _>>()?
                    };
                    let free = (0..p.size).find(|s| !taken.contains(&i64::from(*s)));
                    let Some(free) = free else { return Err(StoreError::PoolExhausted(p.pool.to_owned())) };
                    tx.execute(
                        "INSERT INTO pool_slots (pool, slot, lease_id) VALUES (?1, ?2, ?3)",
                        params![p.pool, i64::from(free), lease.lease_id],
                    )?;
                    Some(free)
                }
            };
            let hosts = serde_json::to_string(&lease.hosts).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO leases (lease_id, run, namespace, credential, provider, delivery, bearer_hash, hosts,
                 pool_slot, issued_at, expires_at, revoked) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 0)",
                params![
                    lease.lease_id,
                    lease.run,
                    lease.namespace,
                    lease.credential,
                    lease.provider,
                    delivery_str(lease.delivery),
                    lease.bearer_hash.map(|h| h.to_vec()),
                    hosts,
                    slot.map(i64::from),
                    to_i64(lease.issued_at),
                    to_i64(lease.expires_at),
                ],
            )?;
            tx.commit()?;
            Ok(slot)
        })
    }

    /// Removes a lease entirely (used to undo an issue whose audit record failed).
    fn delete_lease(&self, lease_id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM pool_slots WHERE lease_id = ?1", [lease_id])?;
            tx.execute("DELETE FROM leases WHERE lease_id = ?1", [lease_id])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn lease(&self, lease_id: &str) -> Result<Option<LeaseInfo>, StoreError> {
        Ok(self
            .query_leases("SELECT * FROM leases WHERE lease_id = ?1", [lease_id])?
            .into_iter()
            .next())
    }

    fn lease_by_bearer_hash(&self, hash: &[u8; 32]) -> Result<Option<LeaseInfo>, StoreError> {
        Ok(self
            .query_leases(
                "SELECT * FROM leases WHERE bearer_hash = ?1",
                [hash.to_vec()],
            )?
            .into_iter()
            .next())
    }

    fn leases_for_run(&self, run: &str) -> Result<Vec<LeaseInfo>, StoreError> {
        self.query_leases(
            "SELECT * FROM leases WHERE run = ?1 ORDER BY issued_at, lease_id",
            [run],
        )
    }

    fn all_leases(&self) -> Result<Vec<LeaseInfo>, StoreError> {
        self.query_leases("SELECT * FROM leases ORDER BY issued_at, lease_id", [])
    }

    fn set_expiry(&self, lease_id: &str, expires_at: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE leases SET expires_at = ?2 WHERE lease_id = ?1",
                params![lease_id, to_i64(expires_at)],
            )?;
            Ok(())
        })
    }

    /// Revokes a lease and releases its pool slot. Returns false if it was already revoked.
    fn revoke(&self, lease_id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE leases SET revoked = 1 WHERE lease_id = ?1 AND revoked = 0",
                [lease_id],
            )?;
            tx.execute("DELETE FROM pool_slots WHERE lease_id = ?1", [lease_id])?;
            tx.commit()?;
            Ok(n > 0)
        })
    }

    /// Revokes every live lease of a run; returns the revoked lease ids.
    fn revoke_run(&self, run: &str) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let ids: Vec<String> = {
                let mut stmt =
                    tx.prepare("SELECT lease_id FROM leases WHERE run = ?1 AND revoked = 0")?;
                stmt.query_map([run], |r| r.get(0))?
                    .collect::<Result<_, _>>()?
            };
            for id in &ids {
                tx.execute("UPDATE leases SET revoked = 1 WHERE lease_id = ?1", [id])?;
                tx.execute("DELETE FROM pool_slots WHERE lease_id = ?1", [id])?;
            }
            tx.commit()?;
            Ok(ids)
        })
    }

    /// Current reservations of a pool: (slot, lease id).
    fn pool_reservations(&self, pool: &str) -> Result<Vec<(u32, String)>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT slot, lease_id FROM pool_slots WHERE pool = ?1 ORDER BY slot")?;
            let rows = stmt.query_map([pool], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (slot, id) = row?;
                out.push((
                    u32::try_from(slot).map_err(|_| StoreError::Corrupt("slot".into()))?,
                    id,
                ));
            }
            Ok(out)
        })
    }

    /// Deletes leases that expired or were revoked before `cutoff` (and their reservations).
    /// Returns how many were removed. Live leases are never touched.
    fn purge_before(&self, cutoff: u64) -> Result<usize, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM pool_slots WHERE lease_id IN
                 (SELECT lease_id FROM leases WHERE expires_at < ?1 OR (revoked = 1 AND issued_at < ?1))",
                [to_i64(cutoff)],
            )?;
            let n = tx.execute(
                "DELETE FROM leases WHERE expires_at < ?1 OR (revoked = 1 AND issued_at < ?1)",
                [to_i64(cutoff)],
            )?;
            // An expired intermediate needs no revocation entry: chains through it fail anyway.
            tx.execute("DELETE FROM node_cas WHERE not_after < ?1", [to_i64(cutoff)])?;
            tx.commit()?;
            Ok(n)
        })
    }

    fn record_node_ca(&self, record: &NodeCaRecord) -> Result<NodeCaAdmission, StoreError> {
        self.with(|c| {
            // IMMEDIATE: the write lock is taken before the check, so a bar committed by
            // another process cannot land between the check and the insert.
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(block) = node_block(&tx, &record.node)? {
                return Ok(NodeCaAdmission::Blocked(block));
            }
            tx.execute(
                "INSERT INTO node_cas (serial, node, not_before, not_after, revoked_at, reason)
                 VALUES (?1, ?2, ?3, ?4, NULL, NULL)",
                params![
                    record.serial,
                    record.node,
                    to_i64(record.not_before),
                    to_i64(record.not_after)
                ],
            )?;
            tx.commit()?;
            Ok(NodeCaAdmission::Recorded)
        })
    }

    fn revoke_node_ca(&self, serial: &str, now: u64, reason: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE node_cas SET revoked_at = ?2, reason = ?3 WHERE serial = ?1 AND revoked_at IS NULL",
                params![serial, to_i64(now), reason],
            )?;
            Ok(n > 0)
        })
    }

    fn block_node(&self, node: &str, now: u64, reason: &str) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO node_blocks (node, blocked_at, reason) VALUES (?1, ?2, ?3)
                 ON CONFLICT (node) DO UPDATE SET blocked_at = excluded.blocked_at, reason = excluded.reason",
                params![node, to_i64(now), reason],
            )?;
            let serials = {
                let mut stmt = tx.prepare(
                    "UPDATE node_cas SET revoked_at = ?2, reason = ?3
                     WHERE node = ?1 AND revoked_at IS NULL AND not_after > ?2 RETURNING serial",
                )?;
                let rows = stmt.query_map(params![node, to_i64(now), reason], |r| r.get(0))?;
                rows.collect::<Result<Vec<String>, _>>()?
            };
            tx.commit()?;
            Ok(serials)
        })
    }

    fn unblock_node(&self, node: &str) -> Result<bool, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM node_blocks WHERE node = ?1", [node])? > 0))
    }

    fn node_cas(&self, now: u64) -> Result<Vec<NodeCaRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT serial, node, not_before, not_after, revoked_at, reason FROM node_cas
                 WHERE not_after > ?1 ORDER BY node, not_after, serial",
            )?;
            let rows = stmt.query_map([to_i64(now)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (serial, node, not_before, not_after, revoked_at, reason) = row?;
                out.push(NodeCaRecord {
                    serial,
                    node,
                    not_before: to_u64(not_before, "not_before")?,
                    not_after: to_u64(not_after, "not_after")?,
                    revoked_at: revoked_at.map(|v| to_u64(v, "revoked_at")).transpose()?,
                    reason,
                });
            }
            Ok(out)
        })
    }

    fn node_blocks(&self) -> Result<Vec<NodeBlock>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT node, blocked_at, reason FROM node_blocks ORDER BY node")?;
            let rows = stmt.query_map([], node_block_from_row)?;
            let mut out = Vec::new();
            for row in rows {
                let (node, at, reason) = row?;
                out.push(NodeBlock {
                    node,
                    blocked_at: to_u64(at, "blocked_at")?,
                    reason,
                });
            }
            Ok(out)
        })
    }

    fn next_turn_seq(&self, namespace: &str, run: &str) -> Result<Option<u64>, StoreError> {
        self.with(|c| {
            let seq: i64 = c.query_row(
                "INSERT INTO turn_seqs (namespace, run, seq) VALUES (?1, ?2, 1) \
                 ON CONFLICT (namespace, run) DO UPDATE SET seq = seq + 1 RETURNING seq",
                params![namespace, run],
                |row| row.get(0),
            )?;
            u64::try_from(seq)
                .map(Some)
                .map_err(|_| StoreError::Corrupt(format!("negative turn sequence {seq}")))
        })
    }

    /// Cheap liveness probe for readiness.
    fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| {
            c.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
    }

    fn schema_version(&self) -> Result<i64, StoreError> {
        self.with(|c| current_version(c))
    }
}

fn current_version(c: &Connection) -> Result<i64, StoreError> {
    let versioned: bool = c.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version')",
        [],
        |r| r.get(0),
    )?;
    if !versioned {
        return Ok(0);
    }
    Ok(c.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?)
}

/// Applies the migrations the database has not seen, each in its own transaction with its
/// version row. A database newer than this binary is refused (no silent downgrade).
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found = current_version(&tx)?;
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
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, strftime('%s','now'))",
            [n],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // Best effort: the directory should already be private; a failure here is not fatal
    // because the file holds no usable bearer.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(test)]
mod tests {
    use super::*;
    // The shared suite's fixture.
    use crate::store::tests::lease;

    #[test]
    fn pool_slots_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let pool = Some(PoolRequest {
            pool: "pats",
            size: 2,
        });
        {
            let s = SqliteStore::open(&path).expect("open");
            assert_eq!(
                s.insert_lease(&lease("l1", "r1", "pats", 1, 10_000), pool, 200)
                    .expect("l1"),
                Some(0)
            );
        }
        // What the shared suite (`store::tests`) checks on one handle; here only that the
        // reservation outlived the handle.
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(
            s.insert_lease(&lease("l2", "r2", "pats", 2, 10_000), pool, 200)
                .expect("l2"),
            Some(1)
        );
        assert!(matches!(
            s.insert_lease(&lease("l3", "r3", "pats", 3, 10_000), pool, 200),
            Err(StoreError::PoolExhausted(_))
        ));
        assert_eq!(s.pool_reservations("pats").expect("list").len(), 2);
    }

    #[test]
    fn runs_round_trip_and_database_holds_no_bearer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let s = SqliteStore::open(&path).expect("open");
        let run = RunInfo {
            run: "r".into(),
            namespace: "ns".into(),
            template: "t".into(),
            phase: RunPhase::Running,
        };
        s.upsert_run(&run, 1).expect("upsert");
        assert_eq!(s.run("r").expect("q"), Some(run));
        assert_eq!(s.run("x").expect("q"), None);
        let bearer = crate::bearer::generate("user-secret").expect("generate");
        let mut l = lease("l", "r", "c", 0, 10);
        l.bearer_hash = Some(crate::bearer::hash(bearer.expose()));
        s.insert_lease(&l, None, 1).expect("insert");
        drop(s);
        let mut raw = std::fs::read(&path).expect("read db");
        if let Ok(wal) = std::fs::read(dir.path().join("b.db-wal")) {
            raw.extend(wal);
        }
        let needle = bearer.expose().as_bytes();
        assert!(!raw.windows(needle.len()).any(|w| w == needle));
    }
}
