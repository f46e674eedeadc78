//! `scripts/run-local` with private servers: it starts the feed only once
//! the worker is ready, says where the metrics and the binary are and how to
//! read data back; however it is stopped (a double Ctrl-C, `timeout -s INT`)
//! it leaves no process and no temporary directory behind.
//!
//! The script runs the test build of the binary (`RUN_LOCAL_BIN`), not a
//! release build, so each test takes about as long as PostgreSQL's initdb
//! plus a few seconds.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{free_port, wait_for};

/// The processes whose command line or environment mentions `marker` (the
/// test's own TMPDIR, which every process the script starts inherits or is
/// given as a path): pid and command line.
fn processes_marked(marker: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let read = |file: &str| std::fs::read(entry.path().join(file)).unwrap_or_default();
        let state = String::from_utf8_lossy(&read("stat")).to_string();
        // A zombie is already gone; its parent has yet to reap it.
        if state
            .rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('Z'))
        {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&read("cmdline")).replace('\0', " ");
        let environ = String::from_utf8_lossy(&read("environ")).to_string();
        if cmdline.contains(marker) || environ.contains(marker) {
            found.push((pid, cmdline.trim().to_string()));
        }
    }
    found
}

/// A scratch TMPDIR the postgres user can enter (for the script's initdb as root).
fn scratch_tmpdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("tv-run-local-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The script's process group; a failing test still stops it (as a double
/// Ctrl-C would) so nothing outlives the test.
struct Job(Child);

impl Drop for Job {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        for _ in 0..2 {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT);
            std::thread::sleep(Duration::from_millis(300));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn run_local(program: &str, args: &[&str], tmp: &Path, log: &Path, http_port: u16) -> Job {
    let closed = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/run-local");
    let mut command = Command::new(program);
    command
        .args(args)
        .arg(script)
        .env("TMPDIR", tmp)
        .env("RUN_LOCAL_BIN", env!("CARGO_BIN_EXE_tickvault"))
        // Nothing answers here: the script starts private servers.
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{closed}/postgres"),
        )
        .env("NATS_URL", format!("nats://127.0.0.1:{closed}"))
        .env("TICKVAULT_HTTP__ADDR", format!("127.0.0.1:{http_port}"))
        .env("FEED_RATE", "100")
        .env("RUST_LOG", "info")
        .env_remove("TICKVAULT_LOG__FORMAT")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap())
        // Its own process group, as a job in a terminal.
        .process_group(0);
    Job(command.spawn().expect("scripts/run-local starts"))
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits for `child` to exit within `bound`.
async fn exit_status(job: &mut Job, bound: Duration) -> std::process::ExitStatus {
    wait_for(bound, "run-local to exit", || {
        let status = job.0.try_wait().unwrap();
        async move { status }
    })
    .await
}

fn assert_nothing_left(tmp: &Path, seen: &[(i32, String)], log: &str) {
    let marker = tmp.to_str().unwrap();
    let left = processes_marked(marker);
    assert!(left.is_empty(), "processes left behind: {left:?}\n{log}");
    for (pid, cmdline) in seen {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.replace('\0', " ").trim() == cmdline);
        assert!(!alive, "{pid} {cmdline} still runs\n{log}");
    }
    let entries: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(entries.is_empty(), "left in TMPDIR: {entries:?}\n{log}");
}

fn assert_private_servers_seen(seen: &[(i32, String)], log: &str) {
    for what in ["nats-server", "postgres -D"] {
        assert!(
            seen.iter().any(|(_, c)| c.contains(what)),
            "no {what} among {seen:?}\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn run_local_serves_data_then_a_double_ctrl_c_leaves_nothing_behind() {
    let tmp = scratch_tmpdir();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("run-local.log");
    let http_port = free_port();
    let mut job = run_local("bash", &[], tmp.path(), &log, http_port);
    let started = Instant::now();
    wait_for(
        Duration::from_secs(180),
        "run-local to be running",
        || async {
            let text = read(&log);
            assert!(!text.contains("run-local: error"), "{text}");
            text.contains("run-local: running.").then_some(())
        },
    )
    .await;
    println!("run-local was running after {:?}", started.elapsed());
    let text = read(&log);
    let seen = processes_marked(tmp.path().to_str().unwrap());
    assert_private_servers_seen(&seen, &text);
    for what in ["tickvault run", "tickvault feed"] {
        assert!(
            seen.iter().any(|(_, c)| c.contains(what)),
            "no {what}: {seen:?}"
        );
    }
    // The feed came after the worker was ready, so its subjects were captured.
    let ready_at = text
        .find("the worker is ready; starting the synthetic feed")
        .expect("ready line");
    assert!(!text.contains("no JetStream stream captures"), "{text}");
    assert!(
        text[ready_at..].contains("publishing the synthetic feed"),
        "{text}"
    );
    // The real metrics URL, the binary and a command that returns data now.
    let metrics = format!("http://127.0.0.1:{http_port}/metrics");
    assert!(text.contains(&format!("metrics: {metrics}")), "{text}");
    assert!(
        text.contains(&format!("binary:  {}", env!("CARGO_BIN_EXE_tickvault"))),
        "{text}"
    );
    let body = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
    assert!(body.contains("tickvault_rows_written_total"), "{body}");
    let latest = text
        .lines()
        .find(|l| l.contains(" latest candles FPT VNM HPG"))
        .expect("a latest command");
    let output = tokio::task::block_in_place(|| {
        Command::new("sh")
            .arg("-c")
            .arg(latest.trim())
            .output()
            .unwrap()
    });
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{latest}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        printed.lines().nth(1).is_some_and(|l| l.starts_with("FPT")),
        "{latest}:\n{printed}"
    );

    // Ctrl-C twice, as a terminal sends it to the whole job.
    let group = nix::unistd::Pid::from_raw(job.0.id() as i32);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT);
    let status = exit_status(&mut job, Duration::from_secs(90)).await;
    let text = read(&log);
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("run-local: stopped"), "{text}");
    assert_nothing_left(tmp.path(), &seen, &text);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_local_under_timeout_leaves_nothing_behind() {
    let tmp = scratch_tmpdir();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("run-local.log");
    let mut job = run_local(
        "timeout",
        &["-s", "INT", "600", "bash"],
        tmp.path(),
        &log,
        free_port(),
    );
    // Note every process of the run until `timeout` stops it. Its time runs
    // out once everything is up: SIGALRM is the alarm `timeout` itself sets,
    // so this is its expiry, without racing a slow start-up on a busy machine.
    let mut seen: Vec<(i32, String)> = Vec::new();
    let mut expired = false;
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = job.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "run-local did not stop:\n{}",
            read(&log)
        );
        for process in processes_marked(tmp.path().to_str().unwrap()) {
            if !seen.contains(&process) {
                seen.push(process);
            }
        }
        if !expired && read(&log).contains("run-local: running.") {
            let timeout = nix::unistd::Pid::from_raw(job.0.id() as i32);
            nix::sys::signal::kill(timeout, nix::sys::signal::Signal::SIGALRM).unwrap();
            expired = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = read(&log);
    assert_eq!(status.code(), Some(124), "timeout stopped it: {text}");
    assert_private_servers_seen(&seen, &text);
    assert!(text.contains("run-local: stopped"), "{text}");
    assert_nothing_left(tmp.path(), &seen, &text);
}
