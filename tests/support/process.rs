//! Child processes and scratch directories: what every part of the harness
//! that starts a process or writes files relies on to leave nothing behind.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use tempfile::TempDir;

/// A fresh temporary directory, removed when the returned guard drops.
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("pingress-test-")
        .tempdir()
        .expect("create temp dir")
}

pub(super) fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Drains a child's pipe into a shared string so the child can never block
/// on a full pipe, and the text is still available for failure messages.
pub(super) fn drain_to_string<R: Read + Send + 'static>(
    mut r: R,
    sink: Arc<Mutex<String>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            }
        }
    })
}

/// The binary of `examples/<name>.rs`. `cargo test` builds the examples
/// beside the test binaries (`target/<profile>/examples/`); a run of one
/// test file (`cargo test --test x`) does not, so a missing one is built
/// here. One already there is taken as it is: after editing an example,
/// run `cargo test` (or `cargo build --examples`) to rebuild it.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> -> target/<profile>/examples/<name>
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test binary lives in target/<profile>/deps");
    let binary = profile.join("examples").join(name);
    if !binary.exists() {
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--example", name, "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(profile.parent().expect("target/<profile>"));
        if profile.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo");
        assert!(status.success(), "cargo build --example {name} failed");
    }
    binary
}
