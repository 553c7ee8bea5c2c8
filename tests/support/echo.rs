//! The `pingress-echo` upstream: one, or several as the pods of a Service,
//! and the JSON replies in which it says what it received.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use super::pki::CertFiles;
use super::process::{drain_to_string, example_binary, kill_child};

/// The echo upstream, an example of this package.
pub fn pingress_echo() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| example_binary("pingress-echo")).clone()
}

/// A running `pingress-echo` on 127.0.0.1, killed on drop.
pub struct Echo {
    child: Child,
    addr: SocketAddr,
    name: String,
    stderr: Arc<Mutex<String>>,
}

impl Echo {
    pub fn plain(name: &str) -> Echo {
        Echo::spawn(name, Vec::new())
    }

    pub fn tls(name: &str, cert: &CertFiles) -> Echo {
        Echo::spawn(
            name,
            vec![
                "--tls-cert".into(),
                cert.cert.clone().into(),
                "--tls-key".into(),
                cert.key.clone().into(),
            ],
        )
    }

    /// TLS that verifies client certificates against `ca`; with `require`
    /// the handshake fails when no (valid) client certificate is presented.
    pub fn mtls(name: &str, cert: &CertFiles, ca: &Path, require: bool) -> Echo {
        let mut args: Vec<OsString> = vec![
            "--tls-cert".into(),
            cert.cert.clone().into(),
            "--tls-key".into(),
            cert.key.clone().into(),
            "--client-ca".into(),
            ca.into(),
        ];
        if require {
            args.push("--require-client-cert".into());
        }
        Echo::spawn(name, args)
    }

    /// Starts pingress-echo with `--listen 127.0.0.1:0 --name <name>` plus
    /// `extra` arguments, and waits (10 s) for its `listening on` line.
    pub fn spawn(name: &str, extra: Vec<OsString>) -> Echo {
        Echo::spawn_on("127.0.0.1:0", name, extra)
    }

    /// A plain echo on `listen`, e.g. `127.0.0.3:<port>`: Linux answers on
    /// all of 127.0.0.0/8, so pods can share a port on their own addresses.
    pub fn plain_on(listen: &str, name: &str) -> Echo {
        Echo::spawn_on(listen, name, Vec::new())
    }

    /// Like [`Echo::spawn`], listening on `listen`.
    pub fn spawn_on(listen: &str, name: &str, extra: Vec<OsString>) -> Echo {
        Echo::try_spawn_on(listen, name, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Echo::spawn_on`]; `Err` says why it did not start (a taken
    /// port, for one).
    pub fn try_spawn_on(listen: &str, name: &str, extra: Vec<OsString>) -> Result<Echo, String> {
        let echo = pingress_echo();
        let mut child = Command::new(&echo)
            .arg("--listen")
            .arg(listen)
            .arg("--name")
            .arg(name)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", echo.display()));

        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_thread = child
            .stderr
            .take()
            .map(|e: ChildStderr| drain_to_string(e, Arc::clone(&stderr)));

        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Keep draining so the echo never blocks on a full pipe.
            for _ in lines {}
        });

        let line = rx.recv_timeout(Duration::from_secs(10));
        let addr = line.as_ref().ok().and_then(|l| {
            l.strip_prefix("listening on ")
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        });
        match addr {
            Some(addr) => Ok(Echo {
                child,
                addr,
                name: name.to_string(),
                stderr,
            }),
            None => {
                kill_child(&mut child);
                if let Some(t) = stderr_thread {
                    let _ = t.join();
                }
                let err = stderr.lock().map(|s| s.clone()).unwrap_or_default();
                Err(format!(
                    "pingress-echo {name:?} did not report its address (got {line:?}); \
                     stderr:\n{err}"
                ))
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whatever the echo wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// `count` echoes named `pod-1`.. on 127.0.0.2, 127.0.0.3.. sharing one
/// port, as the pods of a Kubernetes Service.
pub fn pods(count: usize) -> Vec<Echo> {
    // The first pod's port is the kernel's choice; another test's
    // connection may hold it on the next address, so a taken port means
    // starting over.
    let mut last_error = String::new();
    for _ in 0..10 {
        let first = Echo::plain_on("127.0.0.2:0", "pod-1");
        let port = first.port();
        let others: Result<Vec<Echo>, String> = (2..=count)
            .map(|i| {
                let listen = format!("127.0.0.{}:{port}", i + 1);
                Echo::try_spawn_on(&listen, &format!("pod-{i}"), Vec::new())
            })
            .collect();
        match others {
            Ok(others) => return std::iter::once(first).chain(others).collect(),
            Err(e) => last_error = e,
        }
    }
    panic!("no port free on all of 127.0.0.2..: {last_error}");
}

/// A parsed pingress-echo JSON reply.
#[derive(Clone, Debug)]
pub struct EchoReply {
    pub json: Value,
}

impl EchoReply {
    fn str_field(&self, key: &str) -> String {
        self.json
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }

    pub fn server(&self) -> String {
        self.str_field("server")
    }

    pub fn method(&self) -> String {
        self.str_field("method")
    }

    /// The raw request target the upstream received.
    pub fn uri(&self) -> String {
        self.str_field("uri")
    }

    pub fn version(&self) -> String {
        self.str_field("version")
    }

    /// All headers in received order, names as received.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.json
            .get("headers")
            .and_then(Value::as_array)
            .map(|hs| {
                hs.iter()
                    .filter_map(|h| {
                        let n = h.get(0)?.as_str()?;
                        let v = h.get(1)?.as_str()?;
                        Some((n.to_string(), v.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// First header with this name, case-insensitive.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers_all(name).into_iter().next()
    }

    pub fn headers_all(&self, name: &str) -> Vec<String> {
        self.headers()
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    pub fn body_len(&self) -> u64 {
        self.json
            .get("body_len")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// Per-process connection number; equal values mean the same upstream
    /// connection was reused.
    pub fn connection(&self) -> u64 {
        self.json
            .get("connection")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// This request's number among those with its `x-echo-key`.
    pub fn attempt(&self) -> u64 {
        self.json
            .get("attempt")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// The `tls` object, `None` for plain connections.
    pub fn tls(&self) -> Option<&Value> {
        self.json.get("tls").filter(|t| !t.is_null())
    }

    fn tls_str(&self, key: &str) -> Option<String> {
        self.tls()?.get(key)?.as_str().map(str::to_string)
    }

    pub fn sni(&self) -> Option<String> {
        self.tls_str("sni")
    }

    pub fn tls_version(&self) -> Option<String> {
        self.tls_str("version")
    }

    pub fn alpn(&self) -> Option<String> {
        self.tls_str("alpn")
    }

    fn client_cert_str(&self, key: &str) -> Option<String> {
        self.tls()?
            .get("client_cert")?
            .get(key)?
            .as_str()
            .map(str::to_string)
    }

    /// `CN=..,O=..` of the client certificate the upstream saw.
    pub fn client_cert_subject(&self) -> Option<String> {
        self.client_cert_str("subject")
    }

    pub fn client_cert_issuer(&self) -> Option<String> {
        self.client_cert_str("issuer")
    }

    pub fn client_cert_serial(&self) -> Option<String> {
        self.client_cert_str("serial")
    }
}
