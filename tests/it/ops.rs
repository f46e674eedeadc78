//! Operations: the lag metrics during a stall, every labelled series from
//! start-up, and the shipped operations files (alert rules, dashboards,
//! Prometheus and Grafana configuration) checked against a real worker's
//! `/metrics` with `promtool` and, for SQL panels, a real database.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::Row;
use tickvault::config::IngestMode;

use crate::helpers::{spawn_app, spawn_app_on_private_pg, wait_for, TestApp};
use crate::ingest::tick;

const T0: i64 = 1_764_120_903_000;
const TYPES: [&str; 5] = ["tick", "candle", "foreign", "index", "deriv"];
const KINDS: [&str; 5] = ["ticks", "candles", "foreign", "index", "derivatives"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// `promtool` with `args`; `stdin` is piped in. Returns (success, stdout + stderr).
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/ensure-services installs it from Debian's prometheus package)");
    let mut pipe = child.stdin.take().unwrap();
    if let Some(input) = stdin {
        pipe.write_all(input.as_bytes()).unwrap();
    }
    drop(pipe);
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Series of an exposition: metric name → its label sets (`k=v,k=v`, sorted).
fn series(exposition: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut all: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, _value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut pairs: Vec<String> = labels
            .split("\",")
            .filter(|p| !p.is_empty())
            .map(|p| p.trim_end_matches('"').replacen("=\"", "=", 1))
            .collect();
        pairs.sort();
        all.entry(name.to_string())
            .or_default()
            .insert(pairs.join(","));
    }
    all
}

async fn lag(app: &TestApp, record_type: &str) -> f64 {
    app.metric("tickvault_ingest_lag_seconds", &[("type", record_type)])
        .await
}

#[tokio::test]
async fn pending_and_lag_rise_during_a_stall_and_fall_back_after_recovery() {
    let (mut pg, mut app) = spawn_app_on_private_pg(|config| {
        config.ingest.queue_capacity = 20;
        config.ingest.fetch_batch = 5;
        config.ingest.batch_size = 10;
        config.ingest.flush_interval_ms = 100;
        config.ingest.lag_interval_ms = 1_000;
    })
    .await;
    for seq in 0..10 {
        app.publish_json("tick", "FPT", &tick("FPT", T0, seq, 10.0))
            .await;
    }
    app.wait_for_rows("tick_data", 10).await;
    wait_for(
        Duration::from_secs(10),
        "no lag while keeping up",
        || async { (lag(&app, "tick").await == 0.0).then_some(()) },
    )
    .await;

    pg.stop();
    for seq in 10..110 {
        app.publish_json("tick", "FPT", &tick("FPT", T0, seq, 10.0))
            .await;
    }
    // The queue (20) and a pull (5) are held; the rest waits in JetStream.
    let (pending, ack_pending) = wait_for(
        Duration::from_secs(15),
        "pending and ack-pending to show the stall",
        || async {
            let pending = app
                .metric("tickvault_consumer_pending", &[("type", "tick")])
                .await;
            let ack_pending = app
                .metric("tickvault_consumer_ack_pending", &[("type", "tick")])
                .await;
            (pending >= 50.0 && ack_pending >= 20.0).then_some((pending, ack_pending))
        },
    )
    .await;
    assert!(pending + ack_pending <= 100.0, "{pending} + {ack_pending}");
    let first = wait_for(Duration::from_secs(15), "the lag to pass 1 s", || async {
        let lag = lag(&app, "tick").await;
        (lag >= 1.0).then_some(lag)
    })
    .await;
    // Nothing is delivered during the stall, and the lag keeps moving.
    let received = app
        .metric("tickvault_messages_received_total", &[("type", "tick")])
        .await;
    wait_for(
        Duration::from_secs(15),
        "the lag to keep rising",
        || async { (lag(&app, "tick").await >= first + 1.5).then_some(()) },
    )
    .await;
    assert_eq!(
        app.metric("tickvault_messages_received_total", &[("type", "tick")])
            .await,
        received,
        "no delivery while the queue is full"
    );
    assert_eq!(lag(&app, "candle").await, 0.0, "other types have no lag");
    let (_, body) = app.get("/metrics").await;
    assert!(
        crate::helpers::metric_value(&body, "tickvault_consumer_pending", &[("type", "tick")])
            >= 50.0
    );

    pg.resume();
    app.wait_for_rows("tick_data", 110).await;
    wait_for(
        Duration::from_secs(20),
        "pending, ack-pending and lag back to 0",
        || async {
            let pending = app
                .metric("tickvault_consumer_pending", &[("type", "tick")])
                .await;
            let ack_pending = app
                .metric("tickvault_consumer_ack_pending", &[("type", "tick")])
                .await;
            (pending == 0.0 && ack_pending == 0.0 && lag(&app, "tick").await == 0.0).then_some(())
        },
    )
    .await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn core_mode_lag_comes_from_held_messages_and_pending_stays_0() {
    let (mut pg, mut app) = spawn_app_on_private_pg(|config| {
        config.ingest.mode = IngestMode::Core;
        config.ingest.lag_interval_ms = 1_000;
        config.ingest.flush_interval_ms = 100;
    })
    .await;

    pg.stop();
    for seq in 0..5 {
        let payload = tick("FPT", T0, seq, 10.0).to_string();
        app.nats
            .publish(app.subject("tick", "FPT"), payload.into())
            .await
            .unwrap();
    }
    app.nats.flush().await.unwrap();
    let first = wait_for(Duration::from_secs(15), "the lag to pass 1 s", || async {
        let lag = lag(&app, "tick").await;
        (lag >= 1.0).then_some(lag)
    })
    .await;
    wait_for(
        Duration::from_secs(15),
        "the lag to keep rising",
        || async { (lag(&app, "tick").await >= first + 1.0).then_some(()) },
    )
    .await;
    assert_eq!(
        app.metric("tickvault_consumer_pending", &[("type", "tick")])
            .await,
        0.0
    );
    assert_eq!(
        app.metric("tickvault_consumer_ack_pending", &[("type", "tick")])
            .await,
        0.0
    );

    pg.resume();
    app.wait_for_rows("tick_data", 5).await;
    wait_for(Duration::from_secs(15), "the lag back to 0", || async {
        (lag(&app, "tick").await == 0.0).then_some(())
    })
    .await;
    app.stop().await.unwrap();
}

/// Every labelled series a worker exports, with its exact label sets.
fn expected_series() -> BTreeMap<String, BTreeSet<String>> {
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |name: &str, labels: String| {
        expected.entry(name.to_string()).or_default().insert(labels);
    };
    for t in TYPES {
        for name in [
            "tickvault_queue_depth",
            "tickvault_queue_capacity",
            "tickvault_messages_received_total",
            "tickvault_rows_written_total",
            "tickvault_flush_errors_total",
            "tickvault_flush_duration_seconds_count",
            "tickvault_consumer_pending",
            "tickvault_consumer_ack_pending",
            "tickvault_ingest_lag_seconds",
            "tickvault_dead_letter_failures_total",
            "tickvault_dropped_total",
        ] {
            add(name, format!("type={t}"));
        }
        for reason in [
            "invalid_json",
            "invalid_shape",
            "empty_message",
            "too_large",
            "too_many_records",
            "missing_field",
            "invalid_value",
            "invalid_symbol",
            "database_rejected",
        ] {
            add(
                "tickvault_rejected_total",
                format!("reason={reason},type={t}"),
            );
        }
        for trigger in ["interval", "shutdown", "size"] {
            add(
                "tickvault_flushes_total",
                format!("trigger={trigger},type={t}"),
            );
        }
    }
    for kind in KINDS {
        for code in ["200", "400", "500", "503"] {
            add(
                "tickvault_history_requests_total",
                format!("code={code},kind={kind}"),
            );
        }
        add(
            "tickvault_history_duration_seconds_count",
            format!("kind={kind}"),
        );
    }
    // A request naming no valid kind: a bad request, or one refused before
    // it was parsed (too large, queue full, database down).
    for code in ["400", "503"] {
        add(
            "tickvault_history_requests_total",
            format!("code={code},kind=unknown"),
        );
    }
    for reason in ["too_large", "queue_full", "database_down"] {
        add("tickvault_history_shed_total", format!("reason={reason}"));
    }
    for kind in ["timeout", "connection_refused", "authentication", "other"] {
        add(
            "tickvault_history_db_health_check_failures_total",
            format!("kind={kind}"),
        );
    }
    add(
        "tickvault_history_duration_seconds_count",
        "kind=unknown".into(),
    );
    for kind in ["timeout", "connection_refused", "authentication", "other"] {
        add(
            "tickvault_db_health_check_failures_total",
            format!("kind={kind}"),
        );
    }
    for state in ["idle", "in_use"] {
        add("tickvault_db_pool_connections", format!("state={state}"));
    }
    expected
}

#[tokio::test]
async fn every_labelled_series_exists_from_start_up_and_promtool_finds_the_exposition_clean() {
    let app = spawn_app(|_| {}).await;
    let (_, body) = app.get("/metrics").await;
    let actual = series(&body);
    for (name, labels) in expected_series() {
        assert_eq!(
            actual.get(&name),
            Some(&labels),
            "the label sets of {name} at start-up"
        );
    }
    for name in [
        "tickvault_db_pool_max",
        "tickvault_db_up",
        "tickvault_nats_connected",
        "tickvault_history_db_up",
        "tickvault_history_expired_total",
        "tickvault_history_in_flight",
        "tickvault_history_queue_depth",
        "tickvault_history_queue_wait_seconds_count",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_threads",
    ] {
        assert!(actual.contains_key(name), "{name} is exported");
    }
    let build = actual
        .get("tickvault_build_info")
        .expect("tickvault_build_info is exported");
    assert_eq!(build.len(), 1);
    let labels = build.iter().next().unwrap();
    let version = format!("version={}", env!("CARGO_PKG_VERSION"));
    assert!(labels.ends_with(&version), "{labels}");
    let revision = labels
        .strip_prefix("revision=")
        .and_then(|rest| rest.split(',').next())
        .unwrap();
    assert!(
        revision == "unknown"
            || (revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())),
        "a git revision: {revision}"
    );
    assert!(
        metric_line(&body, "tickvault_queue_capacity", "tick") == 10_000.0,
        "capacity from the configuration at start-up"
    );

    let (clean, report) = promtool(&["check", "metrics"], Some(&body));
    assert!(
        clean && report.trim().is_empty(),
        "promtool check metrics: {report}"
    );
}

fn metric_line(body: &str, name: &str, record_type: &str) -> f64 {
    crate::helpers::metric_value(body, name, &[("type", record_type)])
}

/// Names of tickvault's own and process metrics mentioned in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["tickvault_", "process_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at..];
            let len = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..len];
            let part_of_a_word = before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if !part_of_a_word && !name.ends_with('_') {
                names.insert(name.to_string());
            }
            rest = &tail[len.max(1)..];
        }
    }
    names
}

#[tokio::test]
async fn every_metric_in_the_dashboards_rules_and_readme_exists_in_a_fresh_worker() {
    let app = spawn_app(|_| {}).await;
    let (_, body) = app.get("/metrics").await;
    let exported: BTreeSet<String> = series(&body).into_keys().collect();
    let families: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let mut checked = 0;
    for file in [
        "dashboards/tickvault.json",
        "dashboards/alerts.yml",
        "README.md",
    ] {
        let names = metric_names(&read(file));
        assert!(names.len() >= 10, "{file} names metrics: {names:?}");
        for name in names {
            assert!(
                exported.contains(&name) || families.contains(&name),
                "{file} names `{name}`, which a fresh worker does not export"
            );
            checked += 1;
        }
    }
    assert!(checked > 50);
    // The metrics reference in the README names every family (process_* aside).
    let readme = metric_names(&read("README.md"));
    for family in families.iter().filter(|f| f.starts_with("tickvault_")) {
        assert!(readme.contains(family), "the README documents {family}");
    }
}

/// Grafana's variables and interval macros in a PromQL expression, replaced
/// by what Grafana would send (all instances, all types, one minute).
fn substitute_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
        .replace("$type", ".*")
}

fn dashboard(path: &str) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is JSON: {e}"))
}

fn panels(dashboard: &Value) -> Vec<&Value> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect()
}

fn yaml(path: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is YAML: {e}"))
}

#[test]
fn every_operations_dashboard_query_parses_and_uses_the_datasource_variable() {
    let dashboard = dashboard("dashboards/tickvault.json");
    let variables: Vec<(&str, &str)> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        variables,
        [
            ("datasource", "datasource"),
            ("instance", "query"),
            ("type", "custom")
        ]
    );
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut exprs = 0;
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap();
        assert_eq!(
            panel["datasource"],
            json!({"type": "prometheus", "uid": "${datasource}"}),
            "{title}"
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains("instance=~\"$instance\""),
                "{title}: filtered by the instance variable: {expr}"
            );
            exprs += 1;
            rules.push_str(&format!(
                "      - record: dashboard:panel_{}_{}\n        expr: {}\n",
                panel["id"],
                target["refId"].as_str().unwrap(),
                serde_json::to_string(&substitute_promql(expr)).unwrap()
            ));
        }
    }
    // The instance variable's own query.
    let instances = dashboard["templating"]["list"][1]["query"]["query"]
        .as_str()
        .unwrap();
    let selector = instances
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(", instance)"))
        .expect("label_values(<selector>, instance)");
    rules.push_str(&format!(
        "      - record: dashboard:instances\n        expr: {}\n",
        serde_json::to_string(selector).unwrap()
    ));
    assert!(exprs >= 25, "{exprs} queries");
    let file = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
    std::fs::write(file.path(), &rules).unwrap();
    let (ok, report) = promtool(&["check", "rules", file.path().to_str().unwrap()], None);
    assert!(ok, "every dashboard query parses:\n{report}\n{rules}");

    // A broken query would have been caught.
    std::fs::write(
        file.path(),
        "groups:\n  - name: x\n    rules:\n      - record: x:y\n        expr: sum by (type (up)\n",
    )
    .unwrap();
    assert!(!promtool(&["check", "rules", file.path().to_str().unwrap()], None).0);
}

#[test]
fn the_datasource_interval_is_the_scrape_interval() {
    let prometheus = yaml("dashboards/prometheus.yml");
    let scrape = prometheus["global"]["scrape_interval"].as_str().unwrap();
    let datasources = yaml("dashboards/provisioning/datasources/prometheus.yml");
    let prometheus_source = datasources["datasources"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|d| d["type"] == "prometheus")
        .unwrap();
    assert_eq!(
        prometheus_source["jsonData"]["timeInterval"].as_str(),
        Some(scrape)
    );
    let (ok, report) = promtool(
        &[
            "check",
            "config",
            repo("dashboards/prometheus.yml").to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "promtool check config: {report}");
    assert!(report.contains("1 rule files found"), "{report}");
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["job_name"], "tickvault");
    assert_eq!(
        job["dns_sd_configs"][0]["names"][0], "tickvault",
        "every replica"
    );
}

#[test]
fn alert_rules_pass_promtool_and_each_has_a_summary_description_and_runbook() {
    let (ok, report) = promtool(
        &[
            "check",
            "rules",
            repo("dashboards/alerts.yml").to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "promtool check rules: {report}");
    let (ok, report) = promtool(
        &[
            "test",
            "rules",
            repo("dashboards/alerts.test.yml").to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "promtool test rules: {report}");
    let rules = yaml("dashboards/alerts.yml");
    let tests = read("dashboards/alerts.test.yml");
    let readme = read("README.md");
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            alerts += 1;
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation]
                        .as_str()
                        .is_some_and(|s| s.len() > 10),
                    "{name} has a {annotation}"
                );
            }
            assert!(
                tests.contains(&format!(
                    "alertname: {name}\n        exp_alerts:\n          - exp_labels"
                )),
                "alerts.test.yml shows {name} firing"
            );
            assert!(
                tests.contains(&format!("alertname: {name}\n        exp_alerts: []")),
                "alerts.test.yml shows {name} not firing"
            );
            let heading = format!("#### {name}\n");
            let section = readme
                .split_once(&heading)
                .unwrap_or_else(|| panic!("the README has a runbook section `#### {name}`"))
                .1;
            let section = section.split("\n#").next().unwrap();
            assert!(
                section.contains("1. ") && section.contains("2. ") && section.contains("3. "),
                "the runbook of {name} lists three things to check"
            );
        }
    }
    assert!(alerts >= 10);
}

/// A market dashboard query as Grafana sends it for the range and variables given.
fn substitute_sql(sql: &str, from: &str, to: &str) -> String {
    sql.replace(
        "$__timeFilter(\"timestamp\")",
        &format!("\"timestamp\" BETWEEN '{from}' AND '{to}'"),
    )
    .replace("$__timeFrom()", &format!("'{from}'"))
    .replace("$__timeTo()", &format!("'{to}'"))
    .replace("$__interval_ms", "60000")
    .replace("$symbol", "FPT")
    .replace("$interval", "5m")
    .replace("$contract", "VN30F2412")
    .replace("$index", "VNINDEX")
}

/// Scans of the market tables in a plan: never sequential, and an index
/// scan is bounded by a condition (or a LIMIT above it). Returns how many
/// scans of those tables it saw.
fn check_plan(plan: &Value, under_limit: bool, query: &str) -> usize {
    let tables = [
        "tick_data",
        "candles_1m",
        "foreign_flow",
        "index_snapshots",
        "derivatives",
    ];
    let node = plan["Node Type"].as_str().unwrap_or_default();
    let relation = plan["Relation Name"].as_str().unwrap_or_default();
    let mut scans = 0;
    if tables.contains(&relation) {
        scans += 1;
        assert_ne!(node, "Seq Scan", "a sequential scan of {relation}: {query}");
        assert!(
            plan.get("Index Cond").is_some() || plan.get("Recheck Cond").is_some() || under_limit,
            "an unbounded {node} of {relation}: {query}"
        );
    }
    let limit = under_limit || node == "Limit";
    for child in plan["Plans"].as_array().into_iter().flatten() {
        scans += check_plan(child, limit, query);
    }
    scans
}

#[tokio::test]
async fn every_market_dashboard_query_runs_on_the_contract_tables_through_their_indexes() {
    let app = spawn_app(|_| {}).await;
    let pool = &app.pool;
    // Two days of data (UTC+7 trading hours), a few symbols.
    sqlx::query(
        "INSERT INTO candles_1m (symbol, \"timestamp\", open, high, low, close, volume, value)
         SELECT s, t, 100 + m, 101 + m, 99 + m, 100.5 + m, 1000, 1e8
         FROM unnest(ARRAY['FPT','VNM','HPG']) s,
              generate_series(0, 299) m,
              LATERAL (SELECT TIMESTAMPTZ '2026-11-26 09:00+07' + m * interval '1 minute' AS t) x",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO foreign_flow (symbol, \"timestamp\", buy_volume, sell_volume, buy_value, sell_value)
         SELECT s, TIMESTAMPTZ '2026-11-26 09:00+07' + m * interval '1 minute', 10 * m, 5 * m, 1e6 * m, 2e6 * m
         FROM unnest(ARRAY['FPT','VNM']) s, generate_series(0, 299) m",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO index_snapshots (index_name, \"timestamp\", value, change, change_pct, volume, traded_value, advances, declines, unchanged)
         SELECT i, TIMESTAMPTZ '2026-11-26 09:00+07' + m * interval '30 seconds', 1300 + m, 1, 0.1, 1000 * m, 1e9, 200, 150, 50
         FROM unnest(ARRAY['VN30','VNINDEX']) i, generate_series(0, 599) m",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO derivatives (contract, \"timestamp\", price, basis, open_interest, volume)
         SELECT c, TIMESTAMPTZ '2026-11-26 09:00+07' + m * interval '30 seconds', 1305 + m, 5, 40000 + m, 10
         FROM unnest(ARRAY['VN30F2412','VN30F2501']) c, generate_series(0, 599) m",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(pool).await.unwrap();

    let dashboard = dashboard("dashboards/market.json");
    let (from, to) = ("2026-11-26T02:00:00Z", "2026-11-26T08:00:00Z");
    let mut queries: Vec<(String, String)> = Vec::new();
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            queries.push((
                format!("variable {}", variable["name"]),
                variable["query"].as_str().unwrap().to_string(),
            ));
        }
    }
    for panel in panels(&dashboard) {
        assert_eq!(panel["datasource"]["uid"], "${datasource}");
        for target in panel["targets"].as_array().unwrap() {
            queries.push((
                format!("{} {}", panel["title"], target["refId"]),
                target["rawSql"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");
    let mut connection = pool.acquire().await.unwrap();
    for (what, sql) in &queries {
        let sql = substitute_sql(sql, from, to);
        assert!(!sql.contains('$'), "{what}: every macro substituted: {sql}");
        let rows = sqlx::query(&sql)
            .fetch_all(&mut *connection)
            .await
            .unwrap_or_else(|e| panic!("{what} runs: {e}\n{sql}"));
        assert!(!rows.is_empty(), "{what} returns rows:\n{sql}");
        // With sequential scans priced out, a query that cannot use an index still shows one.
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut *connection)
            .await
            .unwrap();
        let plan = sqlx::query(&format!("EXPLAIN (FORMAT JSON) {sql}"))
            .fetch_one(&mut *connection)
            .await
            .unwrap();
        let plan: Value =
            serde_json::from_str(&plan.try_get_unchecked::<String, _>(0).unwrap()).unwrap();
        sqlx::query("RESET enable_seqscan")
            .execute(&mut *connection)
            .await
            .unwrap();
        assert!(
            check_plan(&plan[0]["Plan"], false, &sql) > 0,
            "{what}: the plan reads a market table: {plan}"
        );
    }
    // The candle bars aggregate the 1-minute rows: 06:00 of data in 5-minute bars.
    let candles = queries.iter().find(|(w, _)| w.contains("candles")).unwrap();
    let bars = sqlx::query(&substitute_sql(&candles.1, from, to))
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(bars.len(), 60, "300 minutes in 5-minute bars");
}

fn compose() -> serde_yaml_ng::Value {
    yaml("docker-compose.prod.yml")
}

/// `${NAME:-default}` → default (what Compose uses when `.env` does not set it).
fn with_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find('}').expect("a closed ${") + at;
        let inner = &rest[at + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, default)| default));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Runs deploy/make-secrets into a fresh directory.
fn make_secrets(extra_san: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(repo("deploy/make-secrets"))
        .arg(dir.path().join("secrets"))
        .env("CERT_EXTRA_SAN", extra_san)
        .stdout(Stdio::null())
        .status()
        .expect("deploy/make-secrets runs (needs openssl)");
    assert!(status.success());
    dir
}

#[test]
fn the_production_compose_pins_images_checks_health_and_keeps_secrets_in_files() {
    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["timescaledb", "nats", "tickvault", "prometheus", "grafana"]
    );
    let text = read("docker-compose.prod.yml");
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let image = with_defaults(service["image"].as_str().expect("an image"));
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
        let version = tag.trim_start_matches('v');
        assert!(
            version
                .split(['-', '.'])
                .take(3)
                .all(|p| p.parse::<u32>().is_ok())
                && version.matches('.').count() >= 2,
            "{name}: {image} is pinned to an exact version"
        );
        let check = &service["healthcheck"]["test"];
        assert!(
            check.as_sequence().is_some_and(|t| t.len() >= 2),
            "{name} has a health check"
        );
        if let Some(depends) = service["depends_on"].as_mapping() {
            for (on, how) in depends {
                assert_eq!(
                    how["condition"], "service_healthy",
                    "{name} waits for {on:?} to be healthy"
                );
            }
        }
        assert!(
            service["logging"]["options"]["max-size"].is_string(),
            "{name} rotates its logs"
        );
        assert!(
            service["deploy"]["resources"]["limits"]["memory"].is_string(),
            "{name} has a memory limit"
        );
        // No secret as a value: passwords only as files.
        for (key, value) in service["environment"].as_mapping().into_iter().flatten() {
            let key = key.as_str().unwrap();
            let value = with_defaults(value.as_str().unwrap_or_default());
            let secretive = ["PASSWORD", "SECRET", "TOKEN", "KEY"]
                .iter()
                .any(|s| key.contains(s));
            if secretive {
                assert!(
                    key.ends_with("_FILE") && value.starts_with("/run/secrets/"),
                    "{name}: {key} is a file under /run/secrets: {value}"
                );
                let secret = value.trim_start_matches("/run/secrets/");
                let listed = service["secrets"]
                    .as_sequence()
                    .is_some_and(|s| s.iter().any(|s| s == secret));
                assert!(listed, "{name} is given the secret {secret}");
            }
            if let Ok(url) = url::Url::parse(&value) {
                assert!(url.password().is_none(), "{name}: no password in {key}");
            }
        }
    }
    assert!(
        compose["services"]["timescaledb"]["ports"].is_null(),
        "the database is never published"
    );
    assert_eq!(
        compose["services"]["timescaledb"]["image"], "timescale/timescaledb:2.18.1-pg15",
        "TimescaleDB 2.18.1 or later (README, TimescaleDB)"
    );
    let tickvault = &compose["services"]["tickvault"];
    assert!(
        tickvault["ports"].is_null() && tickvault["container_name"].is_null(),
        "tickvault scales: no fixed host port, no container name"
    );
    let env = &tickvault["environment"];
    assert_eq!(
        env["DATABASE_URL"],
        "postgres://tickvault@timescaledb:5432/market"
    );
    assert_eq!(env["TICKVAULT_DATABASE__SSLMODE"], "verify-full");
    assert_eq!(
        env["TICKVAULT_DATABASE__SSLROOTCERT"],
        "/run/secrets/ca_cert"
    );
    assert!(env["NATS_URL"].as_str().unwrap().starts_with("tls://"));
    let grace: u64 = tickvault["stop_grace_period"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(grace > 30, "above the worst-case shutdown of 30 s: {grace}");
    // Only NATS and Grafana face users; Prometheus on loopback.
    let published: Vec<String> = services
        .iter()
        .flat_map(|(_, s)| s["ports"].as_sequence().cloned().unwrap_or_default())
        .map(|p| with_defaults(p.as_str().unwrap()))
        .collect();
    assert_eq!(published, ["4222:4222", "127.0.0.1:9090:9090", "3000:3000"]);
    assert!(!text.contains("latest"), "no `latest` anywhere");

    // Every variable has its line in .env.example; every secret file is one
    // that deploy/make-secrets creates.
    let example = read(".env.example");
    let mut rest = text.as_str();
    while let Some(at) = rest.find("${") {
        let name = rest[at + 2..].split([':', '}']).next().unwrap();
        assert!(
            example.lines().any(|l| l.starts_with(&format!("{name}="))),
            ".env.example lists {name}"
        );
        rest = &rest[at + 2..];
    }
    let made = make_secrets("");
    for (secret, spec) in compose["secrets"].as_mapping().unwrap() {
        let file = spec["file"].as_str().unwrap();
        let path = made.path().join(file.trim_start_matches("./"));
        assert!(
            path.is_file(),
            "deploy/make-secrets creates {file} ({secret:?})"
        );
    }
}

/// The NATS server configuration of the compose file with the users
/// deploy/make-secrets writes, on the nats-server here: the worker connects
/// with TLS, its user and password file, ingests and reads its consumers'
/// state for the lag.
#[tokio::test]
async fn the_compose_nats_configuration_and_generated_users_serve_the_worker() {
    let secrets = make_secrets("IP:127.0.0.1");
    let root = secrets.path();
    // The container's layout: /etc/nats/nats-server.conf includes ../../run/secrets/nats_users.
    std::fs::create_dir_all(root.join("etc/nats")).unwrap();
    std::fs::create_dir_all(root.join("run/secrets")).unwrap();
    let s = root.join("secrets");
    for (from, to) in [
        ("nats_users.conf", "nats_users"),
        ("nats_server.crt", "nats_server_cert"),
        ("nats_server.key", "nats_server_key"),
    ] {
        std::fs::copy(s.join(from), root.join("run/secrets").join(to)).unwrap();
    }
    let config = read("deploy/nats/nats-server.conf")
        .lines()
        // The test server's own port and store come from its command line.
        .filter(|l| {
            !l.starts_with("http_port")
                && !l.starts_with("port")
                && !l.trim_start().starts_with("store_dir")
        })
        .map(|l| {
            if l.starts_with("include") {
                l.to_string()
            } else {
                l.replace("/run/secrets/", &format!("{}/run/secrets/", root.display()))
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let conf = root.join("etc/nats/nats-server.conf");
    std::fs::write(&conf, config).unwrap();
    let nats = crate::helpers::NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let compose = compose();
    let env = &compose["services"]["tickvault"]["environment"];
    let app = crate::helpers::spawn_app_on(&url, |config| {
        config.ingest.stream = "MARKET_DATA".into();
        config.ingest.subject_prefix = "md".into();
        config.history.subject_prefix = "history".into();
        config.ingest.lag_interval_ms = 1_000;
        config.nats.user = env["TICKVAULT_NATS__USER"].as_str().map(str::to_string);
        config.nats.password_file = Some(s.join("nats_tickvault_password"));
        config.nats.tls_ca = Some(s.join("ca.crt"));
    })
    .await;
    // The feed's own user publishes; the worker's may not.
    let mut feed_settings = app.config.nats.clone();
    feed_settings.user = Some("feed".into());
    feed_settings.password_file = Some(s.join("nats_feed_password"));
    let feed = tickvault::nats::connect(&feed_settings, |o| o)
        .await
        .unwrap();
    let feed = async_nats::jetstream::new(feed);
    for seq in 0..3 {
        let payload = tick("FPT", T0, seq, 10.0).to_string();
        feed.publish(app.subject("tick", "FPT"), payload.into())
            .await
            .unwrap()
            .await
            .expect("the stream stores what the feed user publishes");
    }
    app.wait_for_rows("tick_data", 3).await;
    // What the lag watch asks, as the worker's user (the test's client uses
    // the app's settings): consumer info and the oldest message of a type.
    let stream = app.js.get_stream_no_info("MARKET_DATA").await.unwrap();
    let info = stream.consumer_info("tickvault-tick").await.unwrap();
    assert_eq!(info.delivered.stream_sequence, 3);
    let first = stream
        .get_first_raw_message_by_subject("md.tick.>", 1)
        .await
        .expect("the worker's user may read stream messages (lag)");
    assert_eq!(first.sequence, 1);
    drop(nats);
}
