//! Test support: a scratch database per test on the PostgreSQL server `cargo xtask test`
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
/// (CI must test PostgreSQL), otherwise a loud skip (`None`).
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
    let mut client = postgres::Client::connect(&admin, postgres::NoTls)
        .unwrap_or_else(|e| panic!("{test}: connecting to the test PostgreSQL server: {e}"));
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap_or_else(|e| panic!("{test}: CREATE DATABASE {name}: {e}"));
    let url = format!("{admin} dbname={name}");
    Some(ScratchDb { admin, name, url })
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}
