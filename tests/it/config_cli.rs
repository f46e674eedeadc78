//! The command line's configuration: `tickvault config` never prints a
//! secret; an invalid setting stops start-up naming its key.

use std::process::Command;

fn tickvault(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_tickvault"))
        .args(args)
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn config_prints_the_effective_configuration_without_secrets() {
    let output = tickvault(
        &["config"],
        &[
            (
                "DATABASE_URL",
                "postgres://app:hunter2@db.internal:5432/market",
            ),
            ("NATS_URL", "nats://feeder:n4ts-pass@127.0.0.1:4222"),
            ("TICKVAULT_INGEST__BATCH_SIZE", "250"),
        ],
    );
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    let parsed: toml::Value = toml::from_str(&printed).expect("the output is TOML");
    assert_eq!(parsed["ingest"]["batch_size"].as_integer(), Some(250));
    assert_eq!(
        parsed["database"]["url"].as_str(),
        Some("postgres://app:***@db.internal:5432/market")
    );
    for secret in ["hunter2", "n4ts-pass"] {
        assert!(!printed.contains(secret), "{printed}");
        assert!(!String::from_utf8_lossy(&output.stderr).contains(secret));
    }
}

#[test]
fn an_invalid_setting_stops_start_up_naming_the_key() {
    for (name, value, key) in [
        ("DB_POOL_MIN", "50", "database.pool_min"),
        ("TICKVAULT_INGEST__BATCH_SIZE", "0", "ingest.batch_size"),
        ("DATABASE_URL", "not a url", "database.url"),
        ("TICKVAULT_LOG__FORMAT", "xml", "log.format"),
    ] {
        let output = tickvault(&["run"], &[(name, value)]);
        assert!(
            !output.status.success(),
            "{name}={value} must stop start-up"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "{name}={value}: {stderr}");
    }
}

#[test]
fn a_missing_config_file_is_an_error_that_names_it() {
    let output = tickvault(&["--config", "/nonexistent/tickvault.toml", "config"], &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/tickvault.toml"));
}

#[test]
fn every_subcommand_has_help() {
    for command in [
        "run", "migrate", "config", "history", "latest", "symbols", "dlq", "import", "feed",
        "bench", "health",
    ] {
        let output = tickvault(&[command, "--help"], &[]);
        assert!(output.status.success(), "{command} --help");
        assert!(!output.stdout.is_empty());
    }
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let closed = crate::helpers::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tickvault"))
        .arg("run")
        .current_dir(dir.path())
        .env(
            "DATABASE_URL",
            format!("postgres://app:hunter2@127.0.0.1:{closed}/market"),
        )
        .env(
            "NATS_URL",
            format!("nats://feeder:n4ts-pass@127.0.0.1:{closed}"),
        )
        .env("TICKVAULT_HTTP__ADDR", "127.0.0.1:0")
        .env("TICKVAULT_LOG__FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    crate::helpers::wait_for(
        std::time::Duration::from_secs(30),
        "the worker to log the unreachable database",
        || async {
            let logged = std::fs::read_to_string(&log_path).unwrap_or_default();
            logged.contains("database is down").then_some(())
        },
    )
    .await;
    let status = crate::helpers::terminate(&mut child, std::time::Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0));
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged.contains("postgres://app:***@127.0.0.1"),
        "the redacted URL is logged"
    );
    for secret in ["hunter2", "n4ts-pass"] {
        assert!(!logged.contains(secret), "{secret} leaked into the log");
    }
}
