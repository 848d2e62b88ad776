//! A private `PostgreSQL` server for the tests of the broker's `PostgreSQL` store.
//!
//! Debian's `postgresql` package provides the binaries (`setup` installs it); the server is a
//! fresh cluster in a temporary directory, reachable only through a Unix socket in that
//! directory (no TCP listener), trust authentication, `fsync` off. It runs as the `postgres`
//! user when xtask runs as root (`PostgreSQL` refuses root) and is stopped and removed when the
//! guard drops, on failure too. Tests find it through [`ENV`] and create one database each.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{output, run};

/// The variable the tests read (`paddock_broker::store::testing::PG_ENV`).
pub const ENV: &str = "PADDOCK_TEST_PG";

/// A running test server; stopped and deleted on drop.
#[derive(Debug)]
pub struct TestPostgres {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    conninfo: String,
}

impl TestPostgres {
    /// The admin connection string, key=value form (tests append `dbname=...`).
    pub fn conninfo(&self) -> &str {
        &self.conninfo
    }
}

/// The newest installed server's binary directory (`/usr/lib/postgresql/<major>/bin`).
fn bin_dir() -> Result<PathBuf> {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(base)
        .with_context(|| format!("{} (is the postgresql package installed?)", base.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no PostgreSQL server binaries under /usr/lib/postgresql")
}

fn command(bin: &Path, tool: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        cmd
    } else {
        Command::new(bin.join(tool))
    }
}

/// Creates and starts the server.
pub fn start() -> Result<TestPostgres> {
    let bin = bin_dir()?;
    let as_postgres = crate::is_root();
    let dir = std::env::temp_dir().join(format!("paddock-pg-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).context("removing a stale test server directory")?;
    }
    std::fs::create_dir_all(&dir).context("creating the test server directory")?;
    if as_postgres {
        let ids = output(Command::new("id").args(["-u", "postgres"]))
            .zip(output(Command::new("id").args(["-g", "postgres"])))
            .context("no postgres user (the postgresql package creates it)")?;
        let uid: u32 = ids.0.trim().parse().context("postgres uid")?;
        let gid: u32 = ids.1.trim().parse().context("postgres gid")?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).context("chown")?;
    }
    // World-searchable: the uid-65534 test tier connects through the socket in here.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let guard = TestPostgres {
        conninfo: format!("host={} user=postgres dbname=postgres", dir.display()),
        dir,
        bin,
        as_postgres,
    };
    let data = guard.dir.join("data");
    run(command(&guard.bin, "initdb", as_postgres)
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        .stdout(std::process::Stdio::null()))
    .context("initdb")?;
    let options = format!(
        "-c listen_addresses='' -c unix_socket_directories='{}' -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c max_connections=400",
        guard.dir.display()
    );
    run(command(&guard.bin, "pg_ctl", as_postgres)
        .arg("-D")
        .arg(&data)
        .args(["-o", &options, "-w", "-t", "60", "-l"])
        .arg(guard.dir.join("server.log"))
        .arg("start")
        .stdout(std::process::Stdio::null()))
    .context("pg_ctl start (see the server.log in the test server directory)")?;
    if !guard.dir.join(".s.PGSQL.5432").exists() {
        bail!("the test PostgreSQL server started but its socket is missing");
    }
    eprintln!(
        "xtask: PostgreSQL test server on {} ({ENV})",
        guard.dir.display()
    );
    Ok(guard)
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = command(&self.bin, "pg_ctl", self.as_postgres)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
