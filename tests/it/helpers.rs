//! `spawn_app` and private servers for the tests.
//!
//! Shared services: `TEST_DATABASE_ADMIN_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `TEST_NATS_URL`
//! (default `nats://127.0.0.1:4222`). Each test gets a fresh database named
//! by a UUID, its own stream and subject prefixes; all are removed on drop.
#![allow(dead_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tickvault::app::RunError;
use tickvault::secret::SecretUrl;
use tickvault::{App, Config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn shared_nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A short unique token for names: database, stream, subject prefixes.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `bound`.
pub async fn wait_for<T, F, Fut>(bound: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > bound {
            panic!("timed out after {bound:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `SELECT count(*)` of a table.
pub async fn count(pool: &PgPool, table: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
}

/// Waits until `table` holds exactly `rows`. A database error (say while a
/// test restarts the server) is waited out, and named if the wait times out.
pub async fn wait_for_rows(pool: &PgPool, table: &str, rows: i64, bound: Duration) {
    let start = Instant::now();
    loop {
        let last = count(pool, table).await;
        if matches!(last, Ok(n) if n == rows) {
            return;
        }
        if start.elapsed() > bound {
            panic!("timed out after {bound:?} waiting for {rows} rows in {table}; last count: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A database of its own on a PostgreSQL server, dropped with the value.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        Self::create_on(&admin_url()).await
    }

    pub async fn create_on(admin_url: &str) -> TestDatabase {
        let name = format!("tv_test_{}", unique());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(admin_url)
            .await
            .expect("the test PostgreSQL answers");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let mut url = url::Url::parse(admin_url).unwrap();
        url.set_path(&name);
        TestDatabase {
            name,
            url: url.to_string(),
            admin_url: admin_url.to_string(),
        }
    }

    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs outside async: psql does it synchronously.
        let _ = Command::new("psql")
            .arg(&self.admin_url)
            .args([
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A configuration for one test: random HTTP port, unique stream and prefixes.
pub fn test_config(database_url: &str, nats_url: &str) -> Config {
    let id = unique();
    let mut config = Config::default();
    config.database.url = SecretUrl::new(database_url);
    config.database.pool_min = 0;
    config.database.pool_max = 5;
    config.nats.url = SecretUrl::new(nats_url);
    config.ingest.stream = format!("TV_{id}");
    config.ingest.subject_prefix = format!("md{id}");
    config.history.subject_prefix = format!("history{id}");
    config.http.addr = "127.0.0.1:0".parse().unwrap();
    config
}

/// The running application of one test, and what the test needs to talk to it.
pub struct TestApp {
    pub config: Config,
    pub http: SocketAddr,
    pub pool: PgPool,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub metrics: std::sync::Arc<tickvault::ops::metrics::Metrics>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), RunError>>>,
    db: Option<TestDatabase>,
    _streams: StreamCleanup,
}

/// Starts the real application on the shared services; `customize` edits its config.
pub async fn spawn_app(customize: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_on(&shared_nats_url(), customize).await
}

/// Like [`spawn_app`], on the NATS server at `nats_url`.
pub async fn spawn_app_on(nats_url: &str, customize: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with(TestDatabase::create().await, nats_url, customize).await
}

/// Like [`spawn_app`], on the database `db` (dropped with the app) and the
/// NATS server at `nats_url`.
pub async fn spawn_app_with(
    db: TestDatabase,
    nats_url: &str,
    customize: impl FnOnce(&mut Config),
) -> TestApp {
    let mut config = test_config(&db.url, nats_url);
    customize(&mut config);
    let mut app = start(config).await;
    app.db = Some(db);
    app.wait_ready().await;
    app
}

/// Like [`spawn_app`], on a database of a private PostgreSQL that the test
/// can stop and start (dropped after the app).
pub async fn spawn_app_on_private_pg(customize: impl FnOnce(&mut Config)) -> (PgServer, TestApp) {
    let pg = PgServer::start();
    let db = TestDatabase::create_on(&pg.admin_url()).await;
    let app = spawn_app_with(db, &shared_nats_url(), customize).await;
    (pg, app)
}

/// `tickvault <args>` against the app's services; no configuration file.
pub fn tickvault_command(app: &TestApp) -> std::process::Command {
    // An empty directory: no tickvault.toml is read.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tickvault-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tickvault"));
    command
        .current_dir(dir)
        .env("NATS_URL", app.config.nats.url.expose())
        .env("DATABASE_URL", app.config.database.url.expose())
        .env(
            "TICKVAULT_HISTORY__SUBJECT_PREFIX",
            &app.config.history.subject_prefix,
        )
        .env(
            "TICKVAULT_INGEST__SUBJECT_PREFIX",
            &app.config.ingest.subject_prefix,
        )
        .env("TICKVAULT_INGEST__STREAM", &app.config.ingest.stream)
        .env("RUST_LOG", "error");
    command
}

pub fn tickvault(app: &TestApp, args: &[&str]) -> std::process::Output {
    tickvault_command(app)
        .args(args)
        .output()
        .expect("the tickvault binary runs")
}

/// Sends SIGTERM to a worker process and waits, within `bound`, for its exit.
pub async fn terminate(
    child: &mut std::process::Child,
    bound: Duration,
) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for(bound, "the worker to exit after SIGTERM", || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await
}

/// Starts the application with `config` as it is, without waiting for readiness.
pub async fn start(config: Config) -> TestApp {
    // Logs only when asked for: `RUST_LOG=info cargo test`.
    if std::env::var_os("RUST_LOG").is_some() {
        tickvault::ops::logging::init(config.log.format);
    }
    let built = App::build(config.clone()).await.expect("the app builds");
    let http = built.http_addr();
    let metrics = built.metrics();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(built.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    // The test's own connections use the app's settings (TLS, credentials).
    // Named apart from the worker's connection, which tests may look for.
    let nats = tickvault::nats::connect(&config.nats, |options| {
        options.retry_on_initial_connect().name("tickvault-test")
    })
    .await
    .expect("test NATS client");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy_with(tickvault::db::connect_options(&config.database).expect("test pool"));
    TestApp {
        _streams: StreamCleanup {
            nats_url: config.nats.url.expose().to_string(),
            stream: config.ingest.stream.clone(),
        },
        js: jetstream::new(nats.clone()),
        config,
        http,
        pool,
        nats,
        metrics,
        stop: Some(stop),
        handle: Some(handle),
        db: None,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(self.url(path)).await.expect("HTTP answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    pub async fn health(&self) -> serde_json::Value {
        let (status, body) = self.get("/health").await;
        assert_eq!(status, 200, "/health is always 200: {body}");
        serde_json::from_str(&body).expect("/health is JSON")
    }

    pub async fn ready_status(&self) -> u16 {
        self.get("/ready").await.0
    }

    pub async fn wait_ready(&self) {
        wait_for(Duration::from_secs(30), "/ready to answer 200", || async {
            (self.ready_status().await == 200).then_some(())
        })
        .await
    }

    /// Waits until `/health` reports the database down.
    pub async fn wait_database_down(&self) {
        wait_for(
            Duration::from_secs(30),
            "/health to report the database down",
            || async { (self.health().await["database"] == "down").then_some(()) },
        )
        .await
    }

    /// A metric's value from `/metrics`, summed over series whose labels
    /// contain `labels`; panics when there is no such series.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, body) = self.get("/metrics").await;
        metric_value(&body, name, labels)
    }

    /// Like [`TestApp::metric`], `None` while no such series exists yet.
    pub async fn metric_if_present(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (_, body) = self.get("/metrics").await;
        try_metric_value(&body, name, labels)
    }

    /// Waits (30 s) until the series exists and is at least `min`; returns its value.
    pub async fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], min: f64) -> f64 {
        wait_for(
            Duration::from_secs(30),
            &format!("{name}{labels:?} >= {min}"),
            || async {
                self.metric_if_present(name, labels)
                    .await
                    .filter(|v| *v >= min)
            },
        )
        .await
    }

    /// Feed subject for a type and symbol: `<prefix>.<type>.<symbol>`.
    pub fn subject(&self, record_type: &str, symbol: &str) -> String {
        format!(
            "{}.{record_type}.{symbol}",
            self.config.ingest.subject_prefix
        )
    }

    /// Publishes to the feed stream and waits for JetStream's ack.
    pub async fn publish(&self, subject: String, payload: impl Into<bytes::Bytes>) -> u64 {
        self.js
            .publish(subject, payload.into())
            .await
            .expect("publish")
            .await
            .expect("stream ack")
            .sequence
    }

    /// Publishes one JSON payload to `<prefix>.<type>.<symbol>`; returns its stream sequence.
    pub async fn publish_json(
        &self,
        record_type: &str,
        symbol: &str,
        payload: &serde_json::Value,
    ) -> u64 {
        self.publish(self.subject(record_type, symbol), payload.to_string())
            .await
    }

    /// The JetStream state of a type's durable consumer (`tickvault-<type>`).
    pub async fn consumer_info(&self, record_type: &str) -> jetstream::consumer::Info {
        let mut consumer: jetstream::consumer::PullConsumer = self
            .js
            .get_stream(&self.config.ingest.stream)
            .await
            .expect("the feed stream exists")
            .get_consumer(&format!("tickvault-{record_type}"))
            .await
            .expect("the consumer exists");
        consumer.info().await.expect("consumer info").clone()
    }

    /// Rows in `table`; a database error fails the test.
    pub async fn count(&self, table: &str) -> i64 {
        count(&self.pool, table)
            .await
            .unwrap_or_else(|e| panic!("count {table}: {e}"))
    }

    /// Waits (30 s) until `table` holds exactly `rows`.
    pub async fn wait_for_rows(&self, table: &str, rows: i64) {
        wait_for_rows(&self.pool, table, rows, Duration::from_secs(30)).await
    }

    /// Stops the app as SIGTERM would and returns its result.
    pub async fn stop(&mut self) -> Result<(), RunError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(40), handle)
            .await
            .expect("shutdown is bounded")
            .expect("the app task does not panic")
    }

    /// The application is still running: it has neither returned nor panicked.
    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Gives the test database to another app (a restart), keeping it alive.
    pub fn take_database(&mut self) -> Option<TestDatabase> {
        self.db.take()
    }

    pub fn set_database(&mut self, db: Option<TestDatabase>) {
        self.db = db;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// Deletes a test's streams (feed and dead letters) from the NATS server when dropped.
pub struct StreamCleanup {
    pub nats_url: String,
    pub stream: String,
}

impl Drop for StreamCleanup {
    fn drop(&mut self) {
        // A helper thread with its own connection: the test's runtime may be
        // blocked in this drop, or already gone.
        let nats_url = self.nats_url.clone();
        let streams = [self.stream.clone(), format!("{}_DLQ", self.stream)];
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let connect = async_nats::connect(nats_url);
                let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), connect).await
                else {
                    return;
                };
                let js = jetstream::new(client);
                for stream in streams {
                    let _ = tokio::time::timeout(Duration::from_secs(2), js.delete_stream(stream))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Sums the samples of `name` whose label set contains every pair of `labels`.
///
/// Panics when no series matches: a misspelt name or label must fail the
/// test, not read as 0 (every contract series is exported from start-up).
pub fn metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    try_metric_value(exposition, name, labels).unwrap_or_else(|| {
        panic!("no series of metric `{name}` with labels {labels:?} in the exposition")
    })
}

/// Like [`metric_value`], `None` when no series matches: for a series that
/// only appears once something happened (e.g. a new label value).
pub fn try_metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, up: bool, bound: Duration) {
    let start = Instant::now();
    loop {
        let open = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if open == up {
            return;
        }
        assert!(
            start.elapsed() < bound,
            "port {port} did not become {}",
            if up { "open" } else { "closed" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A private nats-server with JetStream on a free port, for tests that stop it.
pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// `extra_args` go to nats-server as they are (e.g. a config file).
    pub fn start_with(extra_args: &[&str]) -> NatsServer {
        let mut server = NatsServer {
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        server.resume();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and store.
    pub fn resume(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed");
        self.child = Some(child);
        wait_for_port(self.port, true, Duration::from_secs(10));
    }

    /// Kills the server (SIGKILL: no clean shutdown) and waits for its port to close.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_for_port(self.port, false, Duration::from_secs(10));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A private JetStream cluster of nats-servers on loopback, each with its
/// own free ports (client, route, monitoring) and store; every node is
/// killed and its files removed when dropped.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    /// `--server_name` of each node, in the order of `nodes`.
    pub names: Vec<String>,
    /// The HTTP monitoring port of each node (`/connz`).
    monitor_ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts `size` nodes routed to each other (`--cluster_name`,
    /// `--server_name`, `--cluster`, `--routes`) and waits until JetStream
    /// answers (its meta leader is elected).
    pub async fn start(size: usize) -> NatsCluster {
        let cluster_name = format!("tv_{}", unique());
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let monitor_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let names: Vec<String> = (0..size).map(|i| format!("{cluster_name}_n{i}")).collect();
        let nodes = (0..size)
            .map(|i| {
                let routes: Vec<String> = route_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, port)| format!("nats://127.0.0.1:{port}"))
                    .collect();
                NatsServer::start_with(&[
                    "--server_name",
                    &names[i],
                    "--cluster_name",
                    &cluster_name,
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", route_ports[i]),
                    "--routes",
                    &routes.join(","),
                    "-m",
                    &monitor_ports[i].to_string(),
                ])
            })
            .collect();
        let cluster = NatsCluster {
            nodes,
            names,
            monitor_ports,
        };
        cluster.wait_for_meta_leader().await;
        cluster
    }

    /// Waits until every running node knows the JetStream meta leader (`/jsz`).
    pub async fn wait_for_meta_leader(&self) {
        wait_for(
            Duration::from_secs(30),
            "the JetStream meta leader",
            || async {
                for i in 0..self.nodes.len() {
                    let jsz = self.monitor(i, "jsz").await?;
                    jsz["meta_cluster"]["leader"].as_str()?;
                }
                Some(())
            },
        )
        .await
    }

    /// A monitoring endpoint's JSON of node `i`; `None` while it is down.
    async fn monitor(&self, i: usize, endpoint: &str) -> Option<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/{endpoint}", self.monitor_ports[i]);
        reqwest::get(url).await.ok()?.json().await.ok()
    }

    /// Every node's client URL, comma-separated: a `nats.url` server list.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node whose `--server_name` is `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} is not a node of this cluster"))
    }

    /// The nodes a client named `client_name` is connected to now,
    /// from each running node's `/connz`.
    pub async fn nodes_serving(&self, client_name: &str) -> Vec<usize> {
        let mut serving = Vec::new();
        for i in 0..self.nodes.len() {
            // A node that is down serves no one.
            let Some(connz) = self.monitor(i, "connz?limit=1024").await else {
                continue;
            };
            let connections = connz["connections"].as_array().cloned().unwrap_or_default();
            if connections.iter().any(|c| c["name"] == client_name) {
                serving.push(i);
            }
        }
        serving
    }

    /// Kills node `i` with SIGKILL (its store stays for [`NatsCluster::restart`]).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].resume();
    }
}

/// A private PostgreSQL cluster (`initdb` + `pg_ctl`) on a free port, for
/// tests that stop the database or need server settings of their own. Runs
/// as the `postgres` user when we are root.
pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    running: bool,
}

/// The binaries of the newest PostgreSQL installed (`/usr/lib/postgresql/<v>/bin`).
pub fn pg_bin() -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed under /usr/lib/postgresql")
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    newest.expect("a PostgreSQL server with initdb").1
}

/// The share directory of that PostgreSQL (`pg_config --sharedir`; Debian's
/// `/usr/share/postgresql/<v>` when pg_config is absent): extensions' control
/// files are in its `extension/`.
pub fn pg_sharedir() -> PathBuf {
    let bin = pg_bin();
    let from_pg_config = Command::new(bin.join("pg_config"))
        .arg("--sharedir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    from_pg_config.unwrap_or_else(|| {
        let version = bin.parent().and_then(|p| p.file_name()).unwrap_or_default();
        PathBuf::from("/usr/share/postgresql").join(version)
    })
}

fn pg_command(program: &str) -> Command {
    let path = pg_bin().join(program);
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    pub fn start() -> PgServer {
        Self::start_with(|_| {})
    }

    /// Like [`PgServer::start`]; `configure` gets the data directory after
    /// `initdb` to write files there (certificates, `pg_hba.conf`, lines
    /// appended to `postgresql.conf`) before the server starts. The unix
    /// socket of [`PgServer::psql`] stays `trust` unless `pg_hba.conf` changes it.
    pub fn start_with(configure: impl FnOnce(&std::path::Path)) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("tickvault-pg-")
            .tempdir()
            .unwrap();
        let chown = |path: &std::path::Path| {
            if is_root() {
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(path)
                    .status()
                    .unwrap();
            }
        };
        chown(dir.path());
        let status = pg_command("initdb")
            .args(["-U", "postgres", "--auth=trust", "-D"])
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb is installed");
        assert!(status.success(), "initdb failed");
        configure(&dir.path().join("data"));
        chown(&dir.path().join("data"));
        PgServer::serve(dir)
    }

    /// Starts the cluster whose data directory is `dir/data` on a free port.
    fn serve(dir: tempfile::TempDir) -> PgServer {
        let mut server = PgServer {
            port: free_port(),
            dir,
            running: false,
        };
        server.resume();
        server
    }

    /// A streaming standby of `primary`: `pg_basebackup -R` (which writes
    /// `standby.signal` and `primary_conninfo`) into a data directory of its
    /// own, started on another free port. Read-only; it replays what the
    /// primary writes. The primary's default `pg_hba.conf` (initdb with
    /// trust) admits replication from 127.0.0.1, and `wal_level` is `replica`.
    pub fn standby_of(primary: &PgServer) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("tickvault-pg-standby-")
            .tempdir()
            .unwrap();
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
        }
        let output = pg_command("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            // A fast checkpoint: a spread one waits most of checkpoint_timeout.
            .args(["-U", "postgres", "-X", "stream", "-R", "-c", "fast", "-D"])
            .arg(dir.path().join("data"))
            .output()
            .expect("pg_basebackup is installed");
        assert!(
            output.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PgServer::serve(dir)
    }

    /// Like [`PgServer::start`], with `settings` (lines such as
    /// `shared_preload_libraries = 'timescaledb'`) added to postgresql.conf.
    pub fn start_with_settings(settings: &[&str]) -> PgServer {
        Self::start_with(|data| append_settings(data, settings))
    }

    /// Adds `settings` to postgresql.conf; they apply from the next (re)start.
    pub fn configure(&self, settings: &[&str]) {
        append_settings(&self.data(), settings);
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `sql` as `postgres` through the unix socket; panics on failure.
    pub fn psql(&self, sql: &str) {
        let output = Command::new("psql")
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
            .output()
            .expect("psql is installed");
        assert!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn resume(&mut self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let status = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-o", &options, "-l"])
            .arg(self.dir.path().join("log"))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl runs");
        assert!(status.success(), "pg_ctl start failed");
        self.running = true;
    }

    pub fn stop(&mut self) {
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.running = false;
    }
}

fn append_settings(data: &std::path::Path, settings: &[&str]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .expect("postgresql.conf is writable");
    for line in settings {
        writeln!(file, "{line}").unwrap();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            self.stop();
        }
    }
}
