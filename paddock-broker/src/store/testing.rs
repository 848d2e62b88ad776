//! Test support: a scratch database per test on the `PostgreSQL` server `cargo xtask test`
//! starts (its admin connection string is in [`PG_ENV`]). Not part of the broker's API.

use std::sync::atomic::{AtomicU32, Ordering};

/// The admin connection string (key=value form) of the test server.
pub const PG_ENV: &str = "PADDOCK_TEST_PG";

/// A database created for one test and dropped (connections included) afterwards.
#[derive(Debug)]
pub struct ScratchDb {
    admin: String,
    name: String,
    url: String,
}

impl ScratchDb {
    /// The connection string of the scratch database.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The test server's admin connection string. Without one: a failure under `CI=true`
/// (CI must test `PostgreSQL`), otherwise a loud skip (`None`).
#[must_use]
pub fn admin_url(test: &str) -> Option<String> {
    match std::env::var(PG_ENV) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: CI=true but {PG_ENV} is not set: run the tests with `cargo xtask test`, \
                 which starts a PostgreSQL server"
            );
            eprintln!(
                "SKIPPED {test}: no PostgreSQL server ({PG_ENV} unset; `cargo xtask test` starts one)"
            );
            None
        }
    }
}

/// Creates a uniquely named database on the test server; `None` when there is no server
/// (see [`admin_url`]).
#[must_use]
pub fn scratch_database(test: &str) -> Option<ScratchDb> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let admin = admin_url(test)?;
    let name = format!(
        "pdk_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        test.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(30)
            .collect::<String>()
            .to_ascii_lowercase()
    );
    admin_sql(&admin, &format!("CREATE DATABASE {name}"))
        .unwrap_or_else(|e| panic!("{test}: CREATE DATABASE {name}: {e}"));
    let url = format!("{admin} dbname={name}");
    Some(ScratchDb { admin, name, url })
}

/// Runs `sql` on its own connection, on a thread of its own (tests call this from async
/// tests too, where the synchronous client must not block a runtime thread).
pub fn admin_sql(conninfo: &str, sql: &str) -> Result<(), String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut client =
                postgres::Client::connect(conninfo, postgres::NoTls).map_err(|e| e.to_string())?;
            client.batch_execute(sql).map_err(|e| e.to_string())
        })
        .join()
        .map_err(|_| "the SQL thread panicked".to_owned())?
    })
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let _ = admin_sql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// A loopback TCP relay to the test server's Unix socket that a test can cut and restore:
/// a database outage (connections reset, new ones refused) without touching the server.
#[derive(Debug)]
pub struct Outage {
    port: u16,
    socket: std::path::PathBuf,
    state: std::sync::Arc<std::sync::Mutex<RelayState>>,
}

#[derive(Debug, Default)]
struct RelayState {
    /// Bumped on every cut: an accept loop of an older generation stops.
    generation: u64,
    streams: Vec<std::net::TcpStream>,
}

impl Outage {
    /// Starts relaying 127.0.0.1:<free port> to the socket of the server in `admin` (its
    /// `host=` directory). `None` without a server (see [`admin_url`]).
    #[must_use]
    pub fn start(test: &str) -> Option<(Self, ScratchDb)> {
        let db = scratch_database(test)?;
        let dir = db
            .admin
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("host="))
            .expect("the test server's conninfo names a host= socket directory")
            .to_owned();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = probe.local_addr().expect("addr").port();
        drop(probe);
        let relay = Self {
            port,
            socket: std::path::Path::new(&dir).join(".s.PGSQL.5432"),
            state: std::sync::Arc::default(),
        };
        relay.restore();
        Some((relay, db))
    }

    /// The connection string of `db` through the relay.
    #[must_use]
    pub fn url(&self, db: &ScratchDb) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={} sslmode=disable",
            self.port, db.name
        )
    }

    /// Resets every relayed connection and refuses new ones.
    pub fn cut(&self) {
        let mut state = self.state.lock().expect("relay lock");
        state.generation += 1;
        for s in state.streams.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Wake the accept loop so it sees the new generation and closes the listener.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }

    /// Accepts and relays again (on the same port).
    pub fn restore(&self) {
        let generation = self.state.lock().expect("relay lock").generation;
        let listener = {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match std::net::TcpListener::bind(("127.0.0.1", self.port)) {
                    Ok(l) => break l,
                    Err(e) if std::time::Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => panic!("rebinding the relay port: {e}"),
                }
            }
        };
        let (state, socket) = (self.state.clone(), self.socket.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let mut st = state.lock().expect("relay lock");
                if st.generation != generation {
                    return;
                }
                let Ok(upstream) = std::os::unix::net::UnixStream::connect(&socket) else {
                    continue;
                };
                let (Ok(c2), Ok(u2)) = (conn.try_clone(), upstream.try_clone()) else {
                    continue;
                };
                let Ok(c3) = conn.try_clone() else { continue };
                st.streams.push(c3);
                drop(st);
                std::thread::spawn(move || {
                    let (mut from, mut to) = (c2, u2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let (mut from, mut to) = (upstream, conn);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        });
    }
}
