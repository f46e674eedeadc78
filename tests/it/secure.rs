//! Secure connections against private servers the tests start: PostgreSQL
//! with `ssl = on`, `hostssl` only and SCRAM passwords; nats-server with TLS
//! and each authentication method (user/password with the README's
//! permission blocks, token, NKey, and a `.creds` file in operator mode).
//! Certificates are made here with rcgen, NATS JWTs with nkeys. Also: a
//! history query slower than `database.statement_timeout_ms` is cancelled by
//! the server and answered 503, and the pool survives it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use base64::Engine as _;
use serde_json::{json, Value};
use tickvault::config::{Config, NatsConfig, SslMode};
use tickvault::db::{Database, DbError};
use tickvault::nats::NatsError;
use tickvault::ops::metrics::DbFailureKind;
use tickvault::secret::SecretUrl;

use crate::helpers::{
    free_port, shared_nats_url, spawn_app, start, test_config, tickvault, try_metric_value, unique,
    wait_for, NatsServer, PgServer, StreamCleanup, TestApp, TestDatabase,
};

/// Needs percent-encoding in a URL; given as a file it needs nothing.
const DB_PASSWORD: &str = "p@ss/w:rd+=,1";
const NATS_PASSWORD: &str = "n@ts/p:ss+=";

/// A test CA, a server certificate for 127.0.0.1 and localhost and a client
/// certificate signed by it, and an unrelated CA: PEM files in a directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        fn authority(name: &str) -> (Certificate, KeyPair) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.distinguished_name.push(DnType::CommonName, name);
            (params.self_signed(&key).unwrap(), key)
        }
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let (ca, ca_key) = authority("tickvault test CA");
        let (other, _) = authority("some other CA");
        let leaf = |sans: Vec<String>, name: &str, usage| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "127.0.0.1",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(vec![], "tickvault", ExtendedKeyUsagePurpose::ClientAuth);
        write("ca.pem", ca.pem());
        write("other-ca.pem", other.pem());
        write("server.pem", server);
        write("server-key.pem", server_key);
        write("client.pem", client);
        write("client-key.pem", client_key);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Writes `content` to a new file in `dir` and returns its path.
fn file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn tick(symbol: &str, seq: i64) -> Value {
    json!({"symbol": symbol, "timestamp": "2026-11-26T09:15:03+07:00", "price": 97.5,
           "volume": 100, "side": "buy", "seq": seq})
}

/// Asks `<prefix>.ticks` for a symbol's ticks of 2026 and returns the reply.
async fn history_ticks(client: &async_nats::Client, prefix: &str, symbol: &str) -> Value {
    let body = json!({"symbol": symbol, "from": "2026-01-01", "to": "2026-12-31"});
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(format!("{prefix}.ticks"), body.to_string().into()),
    )
    .await
    .expect("the history service answers")
    .expect("the request is delivered");
    serde_json::from_slice(&reply.payload).expect("replies are JSON")
}

fn rows(reply: &Value) -> usize {
    reply["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("a reply with rows: {reply}"))
        .len()
}

// ---------------------------------------------------------------- PostgreSQL

/// A private PostgreSQL that accepts only TLS and SCRAM passwords over TCP
/// (its unix socket stays `trust` for the test's own `psql`).
fn tls_postgres(pki: &Pki) -> PgServer {
    let pg = PgServer::start_with(|data| {
        std::fs::copy(pki.path("server.pem"), data.join("server.crt")).unwrap();
        let key = data.join("server.key");
        std::fs::copy(pki.path("server-key.pem"), &key).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\npassword_encryption = 'scram-sha-256'\n",
        );
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
    });
    pg.psql(&format!("ALTER ROLE postgres PASSWORD '{DB_PASSWORD}'"));
    pg
}

/// The admin URL of the TLS server: password percent-encoded, `sslmode=require`.
fn tls_admin_url(pg: &PgServer) -> String {
    let mut url = url::Url::parse(&format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
        pg.port
    ))
    .unwrap();
    url.set_password(Some(DB_PASSWORD)).unwrap();
    url.to_string()
}

/// The URL tickvault gets: no password (it comes from a file), no sslmode.
fn app_url(pg: &PgServer, database: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{database}", pg.port)
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_over_tls_with_a_password_file_in_require_and_verify_full_modes() {
    let pki = Pki::new();
    let pg = tls_postgres(&pki);
    let db = TestDatabase::create_on(&tls_admin_url(&pg)).await;
    let secrets = tempfile::tempdir().unwrap();
    let password_file = file(secrets.path(), "db-password", &format!("{DB_PASSWORD}\n"));

    for (symbol, mode, rootcert) in [
        ("FPT", SslMode::Require, None),
        ("VNM", SslMode::VerifyFull, Some(pki.path("ca.pem"))),
    ] {
        let mut config = test_config(&app_url(&pg, &db.name), &shared_nats_url());
        config.database.sslmode = Some(mode);
        config.database.sslrootcert = rootcert;
        config.database.password_file = Some(password_file.clone());
        config.validate().expect("the settings are valid");
        let mut app = start(config).await;
        app.wait_ready().await;

        app.publish_json("tick", symbol, &tick(symbol, 1)).await;
        wait_for(Duration::from_secs(30), "the tick in the table", || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tick_data WHERE symbol = $1")
                .bind(symbol)
                .fetch_one(&app.pool)
                .await
                .ok()?;
            (n == 1).then_some(())
        })
        .await;
        let reply = history_ticks(&app.nats, &app.config.history.subject_prefix, symbol).await;
        assert_eq!(rows(&reply), 1, "{mode:?}: {reply}");

        let encrypted: Option<bool> = sqlx::query_scalar(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'tickvault' AND a.pid <> pg_backend_pid()",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(encrypted, Some(true), "{mode:?}: every session is TLS");
        app.stop().await.expect("a clean stop");
    }
}

#[tokio::test]
async fn a_wrong_ca_or_no_tls_is_an_authentication_error_naming_the_setting() {
    let pki = Pki::new();
    let pg = tls_postgres(&pki);
    let secrets = tempfile::tempdir().unwrap();
    let password_file = file(secrets.path(), "db-password", DB_PASSWORD);
    let check = |mode: SslMode, rootcert: Option<PathBuf>| {
        let mut config = test_config(&app_url(&pg, "postgres"), &shared_nats_url()).database;
        config.sslmode = Some(mode);
        config.sslrootcert = rootcert;
        config.password_file = Some(password_file.clone());
        async move {
            let db = Database::connect_lazy(&config).unwrap();
            let started = Instant::now();
            let error = db.health_check().await.expect_err("the server refuses");
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "fails at once, not after the pool's retries"
            );
            assert_eq!(error.kind(), DbFailureKind::Authentication, "{error}");
            assert!(matches!(error, DbError::Auth { .. }), "{error}");
            error.to_string()
        }
    };
    let wrong_ca = check(SslMode::VerifyFull, Some(pki.path("other-ca.pem"))).await;
    assert!(wrong_ca.contains("certificate"), "{wrong_ca}");
    assert!(wrong_ca.contains("database.sslrootcert"), "{wrong_ca}");
    let plain = check(SslMode::Disable, None).await;
    assert!(plain.contains("pg_hba.conf"), "{plain}");
    assert!(plain.contains("database.sslmode"), "{plain}");
    for message in [wrong_ca, plain] {
        assert!(!message.contains(DB_PASSWORD), "{message}");
    }
}

/// The worker binary on the TLS server with a wrong password: start-up
/// reports it once naming `database.password_file`, `/health` says
/// `auth_failed`, the metric counts it, and checks back off to the longest
/// interval instead of "retrying" every few hundred milliseconds.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_is_reported_once_as_auth_failed_and_never_logged() {
    let pki = Pki::new();
    let pg = tls_postgres(&pki);
    let db = TestDatabase::create_on(&tls_admin_url(&pg)).await;
    let secrets = tempfile::tempdir().unwrap();
    const WRONG: &str = "wrong-Secret-4711";
    let wrong_file = file(secrets.path(), "wrong", &format!("{WRONG}\n"));
    let right_file = file(secrets.path(), "right", &format!("{DB_PASSWORD}\n"));
    let id = unique();
    let http = format!("127.0.0.1:{}", free_port());
    let _streams = StreamCleanup {
        nats_url: shared_nats_url(),
        stream: format!("TV_{id}"),
    };
    let env = |password_file: &Path| -> Vec<(String, String)> {
        [
            ("DATABASE_URL", app_url(&pg, &db.name)),
            ("NATS_URL", shared_nats_url()),
            ("TICKVAULT_DATABASE__SSLMODE", "verify-full".into()),
            (
                "TICKVAULT_DATABASE__SSLROOTCERT",
                pki.path("ca.pem").display().to_string(),
            ),
            (
                "TICKVAULT_DATABASE__PASSWORD_FILE",
                password_file.display().to_string(),
            ),
            ("TICKVAULT_INGEST__STREAM", format!("TV_{id}")),
            ("TICKVAULT_INGEST__SUBJECT_PREFIX", format!("md{id}")),
            ("TICKVAULT_HISTORY__SUBJECT_PREFIX", format!("history{id}")),
            ("TICKVAULT_HTTP__ADDR", http.clone()),
            ("TICKVAULT_LOG__FORMAT", "json".into()),
            ("RUST_LOG", "debug".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let tickvault = |args: &[&str], password_file: &Path| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tickvault"));
        command
            .args(args)
            .current_dir(secrets.path())
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .envs(env(password_file));
        command
    };

    let log_path = secrets.path().join("worker.log");
    let mut worker = tickvault(&["run"], &wrong_file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let get = |path: &'static str| {
        let url = format!("http://{http}{path}");
        async move {
            let response = reqwest::get(url).await.ok()?;
            response.text().await.ok()
        }
    };
    let health: Value = wait_for(Duration::from_secs(15), "/health auth_failed", || async {
        let health: Value = serde_json::from_str(&get("/health").await?).ok()?;
        (health["database_error"] == "auth_failed").then_some(health)
    })
    .await;
    assert_eq!(health["database"], "down", "the contract's values stay");
    let failures = || async {
        let exposition = get("/metrics").await?;
        try_metric_value(
            &exposition,
            "tickvault_db_health_check_failures_total",
            &[("kind", "authentication")],
        )
    };
    let first_seen = wait_for(
        Duration::from_secs(10),
        "one authentication failure",
        || async { (failures().await? >= 1.0).then(Instant::now) },
    )
    .await;
    wait_for(Duration::from_secs(40), "the next check", || async {
        (failures().await? >= 2.0).then_some(())
    })
    .await;
    assert!(
        first_seen.elapsed() >= Duration::from_secs(10),
        "after an authentication failure the next check waits the longest interval (15 s ± 20 %), waited {:?}",
        first_seen.elapsed()
    );
    let status = crate::helpers::terminate(&mut worker, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0));
    let logged = std::fs::read_to_string(&log_path).unwrap();
    let reports: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("refuses tickvault's login"))
        .collect();
    assert_eq!(reports.len(), 1, "reported once: {reports:#?}");
    assert!(
        reports[0].contains("password authentication failed"),
        "{}",
        reports[0]
    );
    assert!(
        reports[0].contains("database.password_file"),
        "{}",
        reports[0]
    );
    assert!(!logged.contains(WRONG) && !logged.contains(DB_PASSWORD));

    // The right password: `tickvault migrate` over verify-full; no secret printed.
    let migrate = tickvault(&["migrate"], &right_file).output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&migrate.stdout),
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert!(migrate.status.success(), "{printed}");
    assert!(!printed.contains(DB_PASSWORD), "{printed}");
    let config = tickvault(&["config"], &right_file).output().unwrap();
    let printed = String::from_utf8_lossy(&config.stdout);
    assert!(config.status.success());
    assert!(printed.contains("password_file = "), "{printed}");
    assert!(!printed.contains(DB_PASSWORD), "{printed}");
}

// -------------------------------------------------------- slow history reads

#[tokio::test(flavor = "multi_thread")]
async fn a_history_query_slower_than_the_statement_timeout_is_cancelled_by_the_server() {
    let app = spawn_app(|config| {
        config.database.pool_max = 4;
        config.database.statement_timeout_ms = 300;
    })
    .await;
    app.publish_json("tick", "FPT", &tick("FPT", 1)).await;
    app.wait_for_rows("tick_data", 1).await;

    // Every tickvault session carries the server-side limits.
    let db = Database::connect_lazy(&app.config.database).unwrap();
    let limits: (String, String) = sqlx::query_as(
        "SELECT current_setting('lock_timeout'), current_setting('idle_in_transaction_session_timeout')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(limits, ("10s".to_string(), "1min".to_string()));
    // The history read transaction: read-only, statements cancelled at 300 ms.
    let mut tx = db.begin_read().await.unwrap();
    let read_only: String = sqlx::query_scalar("SHOW transaction_read_only")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(read_only, "on");
    let slow = sqlx::query("SELECT pg_sleep(5)").execute(&mut *tx).await;
    let code = match slow {
        Err(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
        other => panic!("pg_sleep(5) must be cancelled: {other:?}"),
    };
    assert_eq!(code.as_deref(), Some("57014"), "statement_timeout");
    drop(tx);
    db.pool.close().await;

    // A lock held elsewhere makes every history query slow.
    let mut blocker = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tick_data IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let blocker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *blocker)
        .await
        .unwrap();
    let requests = 4 * app.config.database.pool_max as usize;
    let subject = format!("{}.ticks", app.config.history.subject_prefix);
    let body = json!({"symbol": "FPT", "from": "2026-01-01", "to": "2026-12-31"}).to_string();
    let replies = futures::future::join_all((0..requests).map(|_| {
        let nats = app.nats.clone();
        let subject = subject.clone();
        let body = body.clone();
        async move {
            let reply =
                tokio::time::timeout(Duration::from_secs(60), nats.request(subject, body.into()))
                    .await
                    .expect("answered")
                    .expect("delivered");
            serde_json::from_slice::<Value>(&reply.payload).unwrap()
        }
    }))
    .await;
    for reply in &replies {
        assert_eq!(reply["error"]["code"], 503, "{reply}");
        assert_eq!(reply["error"]["retry_after_s"], 2, "{reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unavailable"),
            "cancelled by the server, not by the client-side bound: {reply}"
        );
    }
    // Nothing of those queries is left on the server.
    let leftovers = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'tickvault' AND pid NOT IN (pg_backend_pid(), $1) \
             AND (state = 'idle in transaction' OR (state = 'active' AND query ILIKE '%tick_data%'))",
        )
        .bind(blocker_pid)
        .fetch_one(&app.pool)
        .await
        .ok()
    };
    wait_for(Duration::from_secs(5), "no history query left", || async {
        (leftovers().await? == 0).then_some(())
    })
    .await;
    blocker.commit().await.unwrap();

    // The same connections serve the next request at once.
    let reply = history_ticks(&app.nats, &app.config.history.subject_prefix, "FPT").await;
    assert_eq!(rows(&reply), 1, "{reply}");
    assert_eq!(app.ready_status().await, 200, "the pool is not exhausted");
    let in_use = app
        .metric("tickvault_db_pool_connections", &[("state", "in_use")])
        .await;
    assert!(in_use <= app.config.database.pool_max as f64);
}

// ---------------------------------------------------------------------- NATS

/// A private nats-server with TLS (client certificates verified when
/// `verify`) and `auth` (a configuration fragment).
fn tls_nats(pki: &Pki, verify: bool, auth: &str) -> (NatsServer, tempfile::NamedTempFile) {
    let mut conf = tempfile::NamedTempFile::new().unwrap();
    use std::io::Write as _;
    write!(
        conf,
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {verify}\n  timeout: 5\n}}\n{auth}\n",
        pki.path("server.pem").display(),
        pki.path("server-key.pem").display(),
        pki.path("ca.pem").display(),
    )
    .unwrap();
    let server = NatsServer::start_with(&["-c", conf.path().to_str().unwrap()]);
    (server, conf)
}

/// A configuration on the shared PostgreSQL and the private NATS server,
/// trusting the test CA; `nats` sets the credentials.
async fn nats_app(
    server: &NatsServer,
    pki: &Pki,
    nats: impl FnOnce(&mut NatsConfig),
) -> (TestApp, TestDatabase) {
    let db = TestDatabase::create().await;
    let mut config = test_config(&db.url, &format!("tls://127.0.0.1:{}", server.port));
    config.nats.tls_ca = Some(pki.path("ca.pem"));
    nats(&mut config.nats);
    config.validate().expect("the settings are valid");
    let app = start(config).await;
    app.wait_ready().await;
    (app, db)
}

/// A tick published through `publisher` is stored and read back through `reader`.
async fn ingest_and_history(
    app: &TestApp,
    publisher: &async_nats::Client,
    reader: &async_nats::Client,
) {
    jetstream::new(publisher.clone())
        .publish(
            app.subject("tick", "FPT"),
            tick("FPT", 7).to_string().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stream ack");
    app.wait_for_rows("tick_data", 1).await;
    let reply = history_ticks(reader, &app.config.history.subject_prefix, "FPT").await;
    assert_eq!(rows(&reply), 1, "{reply}");
}

/// The one-attempt connection of `config` fails as `NatsError::Auth` (or
/// `Tls`) naming `setting`, without `secret` in the message.
async fn refused(config: &NatsConfig, setting: &str, secret: &str) -> NatsError {
    let error = tickvault::nats::connect(config, |o| o.connection_timeout(Duration::from_secs(5)))
        .await
        .expect_err("the server refuses");
    let message = error.to_string();
    assert!(error.is_permanent(), "{message}");
    assert!(
        message.contains(setting),
        "{message} does not name {setting}"
    );
    assert!(!message.contains(secret), "{message}");
    error
}

/// The block between `<!-- name -->` and the end of the next code block of
/// the README, with the default names replaced by the test's.
fn readme_permissions(name: &str, config: &Config) -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find(&format!("<!-- {name} -->"))
        .unwrap_or_else(|| panic!("README.md has the {name} block"));
    let block = &readme[start..];
    let block = &block[block.find("```").unwrap()..];
    let block = &block[block.find('\n').unwrap() + 1..];
    let block = &block[..block.find("```").unwrap()];
    block
        .replace("MARKET_DATA", &config.ingest.stream)
        .replace("\"md.", &format!("\"{}.", config.ingest.subject_prefix))
        .replace(
            "\"history.",
            &format!("\"{}.", config.history.subject_prefix),
        )
}

/// User/password with mutual TLS; the worker and a history-only reader get
/// exactly the README's permission blocks. The CLI connects the same way.
#[tokio::test(flavor = "multi_thread")]
async fn user_and_password_with_client_certificates_and_the_readme_permissions() {
    let pki = Pki::new();
    let secrets = tempfile::tempdir().unwrap();
    // Names and permissions depend on the test's prefixes: make them first.
    let db = TestDatabase::create().await;
    let port_placeholder = test_config(&db.url, "nats://127.0.0.1:1");
    let worker_permissions = readme_permissions("nats-permissions-worker", &port_placeholder);
    let reader_permissions = readme_permissions("nats-permissions-history", &port_placeholder);
    let auth = format!(
        "authorization {{\n users: [\n  {{ user: \"tickvault\", password: \"{NATS_PASSWORD}\", {worker_permissions} }}\n  {{ user: \"reader\", password: \"reader-pw\", {reader_permissions} }}\n  {{ user: \"admin\", password: \"admin-pw\" }}\n ]\n}}"
    );
    let (server, _conf) = tls_nats(&pki, true, &auth);
    let url = format!("tls://127.0.0.1:{}", server.port);
    let as_user = |user: &str, password: &str| {
        let mut nats = port_placeholder.nats.clone();
        nats.url = SecretUrl::new(url.clone());
        nats.user = Some(user.into());
        nats.password_file = Some(file(secrets.path(), user, &format!("{password}\n")));
        nats.tls_ca = Some(pki.path("ca.pem"));
        nats.tls_cert = Some(pki.path("client.pem"));
        nats.tls_key = Some(pki.path("client-key.pem"));
        nats
    };
    let mut config = port_placeholder.clone();
    config.nats = as_user("tickvault", NATS_PASSWORD);
    config.validate().expect("the settings are valid");
    let mut app = start(config).await;
    app.set_database(Some(db));
    app.wait_ready().await;

    let admin = tickvault::nats::connect(&as_user("admin", "admin-pw"), |o| o)
        .await
        .unwrap();
    let reader = tickvault::nats::connect(&as_user("reader", "reader-pw"), |o| o)
        .await
        .unwrap();
    ingest_and_history(&app, &admin, &reader).await;

    // A dead letter goes through the worker's permissions too.
    let js = jetstream::new(admin.clone());
    js.publish(app.subject("tick", "FPT"), "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let dlq = format!("{}_DLQ", app.config.ingest.stream);
    wait_for(Duration::from_secs(30), "the dead letter", || async {
        let mut stream = js.get_stream(&dlq).await.ok()?;
        (stream.info().await.ok()?.state.messages == 1).then_some(())
    })
    .await;

    // The CLI with the reader's settings prints the row.
    let reader_settings = as_user("reader", "reader-pw");
    let cli = |password_file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .current_dir(secrets.path())
            .env("NATS_URL", &url)
            .env("TICKVAULT_NATS__USER", "reader")
            .env("TICKVAULT_NATS__PASSWORD_FILE", password_file)
            .env("TICKVAULT_NATS__TLS_CA", pki.path("ca.pem"))
            .env("TICKVAULT_NATS__TLS_CERT", pki.path("client.pem"))
            .env("TICKVAULT_NATS__TLS_KEY", pki.path("client-key.pem"))
            .env(
                "TICKVAULT_HISTORY__SUBJECT_PREFIX",
                &app.config.history.subject_prefix,
            )
            .env("RUST_LOG", "error")
            .args([
                "history",
                "ticks",
                "FPT",
                "--from",
                "2026-11-26",
                "--to",
                "2026-11-26",
            ])
            .args(["--format", "csv", "--timeout", "10"])
            .output()
            .unwrap()
    };
    let output = cli(reader_settings.password_file.as_deref().unwrap());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 2, "a header and the row: {stdout}");

    // Wrong password: library and CLI say which settings, not the secret.
    let wrong = as_user("tickvault", "not-the-password");
    refused(&wrong, "nats.password_file", "not-the-password").await;
    let output = cli(wrong.password_file.as_deref().unwrap());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(stderr.contains("nats.password_file"), "{stderr}");
    assert!(!stderr.contains("not-the-password"), "{stderr}");
    // An untrusted CA: a TLS error naming nats.tls_ca.
    let mut wrong_ca = as_user("tickvault", NATS_PASSWORD);
    wrong_ca.tls_ca = Some(pki.path("other-ca.pem"));
    let error = refused(&wrong_ca, "nats.tls_ca", NATS_PASSWORD).await;
    assert!(matches!(error, NatsError::Tls { .. }), "{error}");
    // No client certificate where the server verifies them: refused.
    let mut no_cert = as_user("tickvault", NATS_PASSWORD);
    no_cert.tls_cert = None;
    no_cert.tls_key = None;
    assert!(
        tickvault::nats::connect(&no_cert, |o| o.connection_timeout(Duration::from_secs(5)))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_from_a_file_over_required_tls() {
    let pki = Pki::new();
    let secrets = tempfile::tempdir().unwrap();
    const TOKEN: &str = "t0ken/with:odd@chars";
    let (server, _conf) = tls_nats(
        &pki,
        false,
        &format!("authorization {{ token: \"{TOKEN}\" }}"),
    );
    let token_file = file(secrets.path(), "token", &format!("{TOKEN}\n"));
    let (app, _db) = nats_app(&server, &pki, |nats| {
        nats.url = SecretUrl::new(format!("nats://127.0.0.1:{}", server.port));
        nats.tls_required = true;
        nats.token_file = Some(token_file.clone());
    })
    .await;
    ingest_and_history(&app, &app.nats, &app.nats).await;

    let mut wrong = app.config.nats.clone();
    wrong.token_file = Some(file(secrets.path(), "wrong", "wr0ng-token"));
    refused(&wrong, "nats.token_file", "wr0ng-token").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nkey_seed_from_a_file() {
    let pki = Pki::new();
    let secrets = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let (server, _conf) = tls_nats(
        &pki,
        false,
        &format!(
            "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}",
            user.public_key()
        ),
    );
    let seed_file = file(
        secrets.path(),
        "seed",
        &format!("{}\n", user.seed().unwrap()),
    );
    let (app, _db) = nats_app(&server, &pki, |nats| {
        nats.nkey_file = Some(seed_file.clone())
    })
    .await;
    ingest_and_history(&app, &app.nats, &app.nats).await;

    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let mut wrong = app.config.nats.clone();
    wrong.nkey_file = Some(file(secrets.path(), "stranger", &stranger));
    refused(&wrong, "nats.nkey_file", &stranger).await;
}

/// A JWT signed by `issuer` about `subject`, as nats-server's jwt v2 reads it.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: Value) -> String {
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let issued = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"jti": unique().to_uppercase(), "iat": issued, "iss": issuer.public_key(),
                        "name": "tickvault-test", "sub": subject, "nats": nats});
    let signed = format!("{header}.{}", encode(claims.to_string().as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", encode(&signature))
}

/// A `.creds` file's content: the user's JWT and NKey seed.
fn creds(user_jwt: &str, user: &nkeys::KeyPair) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

fn user_jwt(account: &nkeys::KeyPair, user: &nkeys::KeyPair) -> String {
    jwt(
        account,
        &user.public_key(),
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    )
}

/// Operator mode: an operator, an account with JetStream (preloaded in a
/// memory resolver) and a user whose `.creds` file the worker reads.
#[tokio::test(flavor = "multi_thread")]
async fn creds_file_with_an_operator_account_and_user_jwt() {
    let pki = Pki::new();
    let secrets = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        json!({"type": "account", "version": 2, "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}}),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        json!({"type": "account", "version": 2, "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1}}),
    );
    let operator_file = file(secrets.path(), "operator.jwt", &operator_jwt);
    let (server, _conf) = tls_nats(
        &pki,
        false,
        &format!(
            "operator: \"{}\"\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {sys}: \"{system_jwt}\"\n  {}: \"{account_jwt}\"\n}}",
            operator_file.display(),
            account.public_key(),
            sys = system.public_key(),
        ),
    );
    let creds_file = file(
        secrets.path(),
        "user.creds",
        &creds(&user_jwt(&account, &user), &user),
    );
    let (app, _db) = nats_app(&server, &pki, |nats| {
        nats.creds_file = Some(creds_file.clone())
    })
    .await;
    ingest_and_history(&app, &app.nats, &app.nats).await;

    // A user of an account the server does not know.
    let stranger_account = nkeys::KeyPair::new_account();
    let stranger = nkeys::KeyPair::new_user();
    let mut wrong = app.config.nats.clone();
    wrong.creds_file = Some(file(
        secrets.path(),
        "stranger.creds",
        &creds(&user_jwt(&stranger_account, &stranger), &stranger),
    ));
    refused(&wrong, "nats.creds_file", &stranger.seed().unwrap()).await;
}

/// `nats.url` as a list whose first server is down: the worker, the test's
/// client and the CLI all reach the live one.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_list_whose_first_server_is_down_still_connects() {
    let list = format!("nats://127.0.0.1:{}, {}", free_port(), shared_nats_url());
    let app = spawn_app(|config| config.nats.url = SecretUrl::new(list.clone())).await;
    // The app's own clean-up connects to one URL, not a list.
    let _streams = StreamCleanup {
        nats_url: shared_nats_url(),
        stream: app.config.ingest.stream.clone(),
    };
    app.publish_json("tick", "FPT", &tick("FPT", 1)).await;
    app.wait_for_rows("tick_data", 1).await;
    let output = tickvault(
        &app,
        &[
            "history",
            "ticks",
            "FPT",
            "--from",
            "2026-11-26",
            "--to",
            "2026-11-26",
            "--format",
            "csv",
            "--timeout",
            "10",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 2);
}
