//! Test support: a real PostgreSQL (and Redis) for the tests, with no manual step.
//!
//! [`postgres_database`] hands each test a fresh, empty database. The server it lives on is the one
//! `KEYGATE_TEST_DATABASE_URL` names (a URL to a database whose user may `CREATE DATABASE`), or else a
//! throwaway cluster the tests start themselves from the machine's PostgreSQL binaries (Debian's
//! `postgresql` package, installed with apt when missing and running as root) in
//! `$TMPDIR/keygate-test-pg`, on 127.0.0.1:`KEYGATE_TEST_PG_PORT` (54329), trusting local connections,
//! with fsync off. It is left running for the next test binary and run; `pg_ctl -D
//! $TMPDIR/keygate-test-pg/data stop` stops it. Test databases older than two hours are dropped as new
//! ones are made.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// A fresh database on the test PostgreSQL server, as a `postgres://` URL.
pub async fn postgres_database() -> Result<String, String> {
    let admin = match std::env::var("KEYGATE_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => tokio::task::spawn_blocking(local_cluster).await.map_err(|e| e.to_string())??,
    };
    static N: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let name = format!("kg_{now}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let mut conn = PgConnection::connect(&admin)
        .await
        .map_err(|e| format!("cannot connect to the test PostgreSQL ({e}); is it running?"))?;
    drop_old_databases(&mut conn, now).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
    let _ = conn.close().await;
    Ok(with_database(&admin, &name))
}

/// The URL with its path (the database name) replaced.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

async fn drop_old_databases(conn: &mut PgConnection, now: u64) {
    let Ok(names) =
        sqlx::query_scalar::<_, String>("SELECT datname FROM pg_database WHERE datname LIKE 'kg\\_%'")
            .fetch_all(&mut *conn)
            .await
    else {
        return;
    };
    for name in names {
        let made = name.split('_').nth(1).and_then(|s| s.parse::<u64>().ok()).unwrap_or(now);
        if now.saturating_sub(made) > 7200 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            let _ =
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut *conn)
                    .await;
        }
    }
}

/// Starts (once per machine) the throwaway cluster and returns its admin URL.
fn local_cluster() -> Result<String, String> {
    let port: u16 = std::env::var("KEYGATE_TEST_PG_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(54329);
    let root = std::env::temp_dir().join("keygate-test-pg");
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let lock = std::fs::File::create(root.join("lock")).map_err(|e| e.to_string())?;
    // One process sets the cluster up; the others wait here, then find it running.
    lock.lock().map_err(|e| format!("locking {}: {e}", root.display()))?;
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    if ready(port) {
        return Ok(url);
    }
    let bin = postgres_bin()?;
    let data = root.join("data");
    let root_user = is_root();
    let run = |program: &str, args: &[&str]| -> Result<(), String> {
        let path = bin.join(program);
        let mut cmd = if root_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd.args(args).output().map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    if root_user {
        // initdb refuses to run as root: the cluster belongs to the postgres user.
        let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&root).status();
    }
    let data_s = data.display().to_string();
    if !data.join("PG_VERSION").exists() {
        let _ = std::fs::remove_dir_all(&data);
        run("initdb", &["-D", &data_s, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"])?;
    }
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -k {data_s} -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=400 -c shared_buffers=128MB"
    );
    let log = root.join("log").display().to_string();
    if root_user {
        let _ = Command::new("touch").arg(&log).status();
        let _ = Command::new("chown").args(["postgres:postgres", &log]).status();
    }
    run("pg_ctl", &["-D", &data_s, "-o", &options, "-l", &log, "-w", "-t", "60", "start"])?;
    if !ready(port) {
        return Err(format!("the test PostgreSQL did not start on port {port}; see {log}"));
    }
    Ok(url)
}

fn ready(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        && Command::new("pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(true)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.trim_ascii() == b"0").unwrap_or(false)
}

/// The newest `/usr/lib/postgresql/N/bin`, installing Debian's `postgresql` when there is none and this
/// runs as root.
fn postgres_bin() -> Result<PathBuf, String> {
    let find = || -> Option<PathBuf> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, p)| p)
    };
    if let Some(bin) = find() {
        return Ok(bin);
    }
    if is_root() {
        let status = Command::new("sh")
            .args(["-c", "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)"])
            .status()
            .map_err(|e| e.to_string())?;
        if status.success()
            && let Some(bin) = find()
        {
            return Ok(bin);
        }
    }
    Err("no PostgreSQL server binaries in /usr/lib/postgresql: install Debian's `postgresql` package \
         (apt-get install postgresql), or set KEYGATE_TEST_DATABASE_URL to a server the tests may create \
         databases on"
        .into())
}

/// A Redis server for the tests' shared rate limits: `KEYGATE_TEST_REDIS_URL`, or one the tests start
/// themselves (Debian's `redis-server`, installed with apt when missing and running as root) on
/// 127.0.0.1:`KEYGATE_TEST_REDIS_PORT` (56379), without persistence, left running like the PostgreSQL.
pub fn redis_url() -> Result<String, String> {
    if let Ok(url) = std::env::var("KEYGATE_TEST_REDIS_URL")
        && !url.is_empty()
    {
        return Ok(url);
    }
    let port: u16 =
        std::env::var("KEYGATE_TEST_REDIS_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(56379);
    let root = std::env::temp_dir().join("keygate-test-redis");
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let lock = std::fs::File::create(root.join("lock")).map_err(|e| e.to_string())?;
    lock.lock().map_err(|e| format!("locking {}: {e}", root.display()))?;
    let url = format!("redis://127.0.0.1:{port}");
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        return Ok(url);
    }
    let mut child = start_redis(port, &root)?;
    let _ = child.wait();
    Ok(url)
}

/// Starts `redis-server` on 127.0.0.1:`port` (daemonised: the returned child exits at once) and waits
/// until it answers. For a test that stops its own Redis, see [`own_redis`].
fn start_redis(port: u16, dir: &std::path::Path) -> Result<std::process::Child, String> {
    let bin = redis_bin()?;
    let child = Command::new(&bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--daemonize", "yes", "--dir"])
        .arg(dir)
        .args(["--pidfile"])
        .arg(dir.join(format!("redis-{port}.pid")))
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    Err(format!("redis-server did not start on port {port}"))
}

/// A Redis of the calling test's own on `port` (to stop it: kill the pid in the returned file).
pub fn own_redis(port: u16) -> Result<(String, PathBuf), String> {
    let dir = std::env::temp_dir().join(format!("keygate-test-redis-{port}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut child = start_redis(port, &dir)?;
    let _ = child.wait();
    Ok((format!("redis://127.0.0.1:{port}"), dir.join(format!("redis-{port}.pid"))))
}

fn redis_bin() -> Result<PathBuf, String> {
    let bin = PathBuf::from("/usr/bin/redis-server");
    if bin.exists() {
        return Ok(bin);
    }
    if is_root() {
        let _ = Command::new("sh")
            .args(["-c", "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null)"])
            .status();
        if bin.exists() {
            return Ok(bin);
        }
    }
    Err("no redis-server: install Debian's `redis-server` package, or set KEYGATE_TEST_REDIS_URL".into())
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_replace_the_path() {
        assert_eq!(with_database("postgres://u@h:1/postgres", "kg_1"), "postgres://u@h:1/kg_1");
        assert_eq!(with_database("postgres://u@h:1", "kg_1"), "postgres://u@h:1/kg_1");
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }
}
