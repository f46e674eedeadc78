//! Sets `GIT_REVISION` for `tickvault_build_info{revision}`: the
//! environment's `GIT_REVISION` when set (a Docker build passes it as a
//! build argument, having no .git), else `git rev-parse HEAD`, else "unknown".
//! Not a `TICKVAULT_*` name: cargo also sets it for `cargo run`/`cargo test`,
//! where the configuration would read it as a key.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=GIT_REVISION");
    let revision = match std::env::var("GIT_REVISION") {
        Ok(revision) if !revision.trim().is_empty() => revision.trim().to_string(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself, the branch it names, packed refs.
            let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
            watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
            for name in watched {
                if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
        }
    };
    println!("cargo:rustc-env=GIT_REVISION={revision}");
}
