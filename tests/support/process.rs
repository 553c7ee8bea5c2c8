//! Child processes and scratch directories: what every part of the harness
//! that starts a process or writes files relies on to leave nothing behind.

use std::io::Read;
use std::process::Child;
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
