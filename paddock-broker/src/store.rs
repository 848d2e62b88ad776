//! Persistent state in `SQLite` (WAL): runs, leases and PAT pool slots.
//!
//! Bearers are stored only as SHA-256 hashes, so a copied database yields no usable bearer.
//! Pool reservations live in their own table with a primary key on (pool, slot): a slot can
//! never be held by two leases, across restarts included.

use std::{path::Path, sync::Mutex};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::wire::{DeliveryMode, LeaseInfo, RunInfo, RunPhase};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("pool {0} has no free slot")]
    PoolExhausted(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database lock poisoned")]
    Poisoned,
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

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
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

fn delivery_str(d: DeliveryMode) -> &'static str {
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

impl Store {
    /// Opens (creating if needed) the database at `path`, owner-only permissions.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        restrict_permissions(path);
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL for concurrent readers; FULL sync so a reservation acknowledged to a caller
        // survives a crash (a lost reservation could hand one PAT to two runs).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
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

    pub fn upsert_run(&self, run: &RunInfo, now: u64) -> Result<(), StoreError> {
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

    pub fn run(&self, run: &str) -> Result<Option<RunInfo>, StoreError> {
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
    pub fn insert_lease(
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
    pub fn delete_lease(&self, lease_id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM pool_slots WHERE lease_id = ?1", [lease_id])?;
            tx.execute("DELETE FROM leases WHERE lease_id = ?1", [lease_id])?;
            tx.commit()?;
            Ok(())
        })
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

    pub fn lease(&self, lease_id: &str) -> Result<Option<LeaseInfo>, StoreError> {
        Ok(self
            .query_leases("SELECT * FROM leases WHERE lease_id = ?1", [lease_id])?
            .into_iter()
            .next())
    }

    pub fn lease_by_bearer_hash(&self, hash: &[u8; 32]) -> Result<Option<LeaseInfo>, StoreError> {
        Ok(self
            .query_leases(
                "SELECT * FROM leases WHERE bearer_hash = ?1",
                [hash.to_vec()],
            )?
            .into_iter()
            .next())
    }

    pub fn leases_for_run(&self, run: &str) -> Result<Vec<LeaseInfo>, StoreError> {
        self.query_leases(
            "SELECT * FROM leases WHERE run = ?1 ORDER BY issued_at, lease_id",
            [run],
        )
    }

    pub fn all_leases(&self) -> Result<Vec<LeaseInfo>, StoreError> {
        self.query_leases("SELECT * FROM leases ORDER BY issued_at, lease_id", [])
    }

    pub fn set_expiry(&self, lease_id: &str, expires_at: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE leases SET expires_at = ?2 WHERE lease_id = ?1",
                params![lease_id, to_i64(expires_at)],
            )?;
            Ok(())
        })
    }

    /// Revokes a lease and releases its pool slot. Returns false if it was already revoked.
    pub fn revoke(&self, lease_id: &str) -> Result<bool, StoreError> {
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
    pub fn revoke_run(&self, run: &str) -> Result<Vec<String>, StoreError> {
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
    pub fn pool_reservations(&self, pool: &str) -> Result<Vec<(u32, String)>, StoreError> {
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
    pub fn purge_before(&self, cutoff: u64) -> Result<usize, StoreError> {
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
            tx.commit()?;
            Ok(n)
        })
    }

    /// Cheap liveness probe for readiness.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| {
            c.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
    }
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

    fn lease(id: &str, run: &str, cred: &str, hash: u8, expires_at: u64) -> NewLease {
        NewLease {
            lease_id: id.into(),
            run: run.into(),
            namespace: "ns".into(),
            credential: cred.into(),
            provider: "pat-pool".into(),
            delivery: DeliveryMode::ProxyInjected,
            bearer_hash: Some([hash; 32]),
            hosts: vec!["api.github.com".into()],
            issued_at: 100,
            expires_at,
        }
    }

    #[test]
    fn pool_slots_survive_reopen_and_are_never_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let pool = Some(PoolRequest {
            pool: "pats",
            size: 2,
        });
        {
            let s = Store::open(&path).expect("open");
            assert_eq!(
                s.insert_lease(&lease("l1", "r1", "pats", 1, 10_000), pool, 200)
                    .expect("l1"),
                Some(0)
            );
        }
        let s = Store::open(&path).expect("reopen");
        assert_eq!(
            s.insert_lease(&lease("l2", "r2", "pats", 2, 10_000), pool, 200)
                .expect("l2"),
            Some(1)
        );
        assert!(matches!(
            s.insert_lease(&lease("l3", "r3", "pats", 3, 10_000), pool, 200),
            Err(StoreError::PoolExhausted(_))
        ));
        assert!(
            s.lease("l3").expect("query").is_none(),
            "failed insert leaves nothing behind"
        );
        assert!(s.revoke("l1").expect("revoke"));
        assert!(!s.revoke("l1").expect("idempotent"));
        assert_eq!(
            s.insert_lease(&lease("l3", "r3", "pats", 3, 10_000), pool, 200)
                .expect("l3"),
            Some(0)
        );
        let found = s
            .lease_by_bearer_hash(&[2; 32])
            .expect("query")
            .expect("present");
        assert_eq!((found.lease_id.as_str(), found.pool_slot), ("l2", Some(1)));
        assert_eq!(s.pool_reservations("pats").expect("list").len(), 2);
    }

    #[test]
    fn purge_removes_only_dead_leases() {
        let s = Store::open_in_memory().expect("open");
        let pool = Some(PoolRequest { pool: "p", size: 3 });
        s.insert_lease(&lease("old", "r1", "p", 1, 150), pool, 100)
            .expect("old");
        s.insert_lease(&lease("live", "r2", "p", 2, 10_000), pool, 100)
            .expect("live");
        s.insert_lease(&lease("rev", "r3", "p", 3, 10_000), pool, 100)
            .expect("rev");
        s.revoke("rev").expect("revoke");
        assert_eq!(s.purge_before(200).expect("purge"), 2);
        assert!(s.lease("live").expect("q").is_some());
        assert!(s.lease("old").expect("q").is_none() && s.lease("rev").expect("q").is_none());
        assert_eq!(s.pool_reservations("p").expect("list").len(), 1);
    }

    #[test]
    fn expired_reservations_are_released_and_reissue_rotates() {
        let s = Store::open_in_memory().expect("open");
        let pool = Some(PoolRequest { pool: "p", size: 1 });
        s.insert_lease(&lease("a", "r1", "p", 1, 150), pool, 100)
            .expect("a");
        assert_eq!(
            s.insert_lease(&lease("b", "r2", "p", 2, 900), pool, 200)
                .expect("b"),
            Some(0)
        );
        // Same run and credential again: the previous lease is revoked, its slot reused.
        assert_eq!(
            s.insert_lease(&lease("c", "r2", "p", 3, 900), pool, 200)
                .expect("c"),
            Some(0)
        );
        assert!(s.lease("b").expect("q").expect("b").revoked);
        assert!(!s.lease("c").expect("q").expect("c").revoked);
    }

    #[test]
    fn runs_round_trip_and_database_holds_no_bearer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let s = Store::open(&path).expect("open");
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
