//! Integration-test harness: runs the real `pingress` and `pingress-echo`
//! binaries (and the system nginx) as child processes, mints throwaway PKI
//! with openssl, and speaks HTTP/1.1 over raw sockets so tests control every
//! byte (odd request targets, missing Host headers, keep-alive).
//!
//! Every child process is killed on `Drop` and every file lives in a
//! `TempDir` owned by the test, so a failing test leaves nothing behind.

// Each tests/*.rs file compiles its own copy of this module and uses only a
// slice of it; without this every test binary would warn about the rest.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslStream};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, CrlNumber, ExtendedKeyUsage, KeyUsage,
    SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{X509CrlBuilder, X509Name, X509RevokedBuilder, X509};
use serde_json::Value;
use tempfile::TempDir;

pub const PINGRESS: &str = env!("CARGO_BIN_EXE_pingress");
pub const PINGRESS_ECHO: &str = env!("CARGO_BIN_EXE_pingress-echo");
pub const NGINX: &str = "/usr/sbin/nginx";
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// Default read timeout for the HTTP client: long enough for slow CI, short
/// enough that a hung gateway fails the test instead of hanging it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Organization put in every test certificate subject.
pub const TEST_ORG: &str = "pingress tests";

// ---------------------------------------------------------------------------
// Misc helpers
// ---------------------------------------------------------------------------

/// A fresh temporary directory, removed when the returned guard drops.
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("pingress-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Ports handed out by [`free_port`] lie below the kernel's ephemeral range
/// (32768-60999 by default), where every outgoing connection of every test
/// process takes its local port: a port from `bind(0)` is in that range
/// and, once released, is soon some client's source port, or another
/// process's listener.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

/// A port no listener holds now, on 127.0.0.1 or on all addresses (the
/// gateway binds 0.0.0.0). Each test process starts at its own random place
/// in [`PORT_RANGE`] and never hands out a port twice, so concurrent tests
/// and test binaries rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = PORT_RANGE.start + offset as u16;
        let free = |ip: [u8; 4]| TcpListener::bind(SocketAddr::from((ip, port))).is_ok();
        if free([127, 0, 0, 1]) && free([0, 0, 0, 0]) {
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?}");
}

/// Calls `f` every 50 ms until it returns true or `timeout` elapses; returns
/// whether it succeeded so the caller can assert with a useful message.
#[must_use]
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// True once something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Drains a child's pipe into a shared string so the child can never block
/// on a full pipe, and the text is still available for failure messages.
fn drain_to_string<R: Read + Send + 'static>(mut r: R, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
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

// ---------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------

/// A throwaway certificate authority writing PEM files into a directory.
pub struct Pki {
    dir: PathBuf,
    name: String,
    ca_cert: X509,
    ca_key: PKey<Private>,
    ca_pem: String,
    ca_pem_path: PathBuf,
    /// Keeps file names unique when the same CN is issued twice.
    seq: AtomicU32,
}

/// An issued certificate and its key, on disk and in memory.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// PEM chain, leaf first, then the issuing CA.
    pub cert: PathBuf,
    /// PKCS#8 PEM private key.
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    /// The leaf certificate alone.
    pub leaf_pem: String,
    /// Uppercase hex, no leading zero bytes (OpenSSL's BN_bn2hex form, as
    /// pingress-echo reports it).
    pub serial_hex: String,
    pub subject_cn: String,
}

impl CertFiles {
    /// Subject in the one-line form pingress-echo reports: `CN=..,O=..`.
    pub fn subject(&self) -> String {
        format!("CN={},O={TEST_ORG}", self.subject_cn)
    }
}

fn new_ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256 group");
    let ec = EcKey::generate(&group).expect("generate EC key");
    PKey::from_ec_key(ec).expect("wrap EC key")
}

fn subject_name(cn: &str) -> X509Name {
    let mut b = X509Name::builder().expect("name builder");
    // CN first so the one-line form reads `CN=..,O=..`.
    b.append_entry_by_nid(Nid::COMMONNAME, cn).expect("CN");
    b.append_entry_by_nid(Nid::ORGANIZATIONNAME, TEST_ORG)
        .expect("O");
    b.build()
}

fn random_serial() -> (openssl::asn1::Asn1Integer, String) {
    let mut bn = BigNum::new().expect("bignum");
    bn.rand(127, MsbOption::MAYBE_ZERO, false).expect("rand");
    let hex = bn.to_hex_str().expect("hex").to_string().to_uppercase();
    (bn.to_asn1_integer().expect("asn1 int"), hex)
}

/// Validity from an hour ago (tolerates small clock skew between processes)
/// to 30 days ahead.
fn validity() -> (Asn1Time, Asn1Time) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    (
        Asn1Time::from_unix(now - 3600).expect("not_before"),
        Asn1Time::from_unix(now + 30 * 24 * 3600).expect("not_after"),
    )
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

impl Pki {
    /// The default CA, `CN=pingress test CA`.
    pub fn new(dir: &Path) -> Pki {
        Pki::new_named(dir, "pingress")
    }

    /// An independent CA, `CN=<name> test CA`, e.g. `"rogue"` for
    /// certificates that must be rejected.
    pub fn new_named(dir: &Path, name: &str) -> Pki {
        fs::create_dir_all(dir).expect("create pki dir");
        let key = new_ec_key();
        let subject = subject_name(&format!("{name} test CA"));
        let (serial, _) = random_serial();
        let (nb, na) = validity();

        let mut b = X509::builder().expect("x509 builder");
        b.set_version(2).expect("version");
        b.set_serial_number(&serial).expect("serial");
        b.set_subject_name(&subject).expect("subject");
        b.set_issuer_name(&subject).expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&nb).expect("not_before");
        b.set_not_after(&na).expect("not_after");
        b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
            .expect("bc");
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .expect("ku"),
        )
        .expect("ku");
        let skid = SubjectKeyIdentifier::new()
            .build(&b.x509v3_context(None, None))
            .expect("skid");
        b.append_extension(skid).expect("skid");
        b.sign(&key, MessageDigest::sha256()).expect("sign CA");
        let cert = b.build();

        let ca_pem = String::from_utf8(cert.to_pem().expect("pem")).expect("utf8 pem");
        let ca_pem_path = dir.join(format!("{}-ca.crt", sanitize(name)));
        fs::write(&ca_pem_path, &ca_pem).expect("write CA pem");
        Pki {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            ca_cert: cert,
            ca_key: key,
            ca_pem,
            ca_pem_path,
            seq: AtomicU32::new(0),
        }
    }

    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Subject of the CA in pingress-echo's one-line form.
    pub fn ca_subject(&self) -> String {
        format!("CN={} test CA,O={TEST_ORG}", self.name)
    }

    /// A serverAuth certificate with CN `name`. `sans` entries that parse as
    /// IP addresses become IP SANs, the rest DNS SANs; an empty `sans` means
    /// `[name]`, since clients ignore the CN.
    pub fn issue_server(&self, name: &str, sans: &[&str]) -> CertFiles {
        let sans: Vec<&str> = if sans.is_empty() {
            vec![name]
        } else {
            sans.to_vec()
        };
        self.issue("server", name, &sans, true)
    }

    /// A clientAuth certificate with CN `cn` and no SANs.
    pub fn issue_client(&self, cn: &str) -> CertFiles {
        self.issue("client", cn, &[], false)
    }

    fn issue(&self, kind: &str, cn: &str, sans: &[&str], server: bool) -> CertFiles {
        let key = new_ec_key();
        let (serial, serial_hex) = random_serial();
        let (nb, na) = validity();

        let mut b = X509::builder().expect("x509 builder");
        b.set_version(2).expect("version");
        b.set_serial_number(&serial).expect("serial");
        b.set_subject_name(&subject_name(cn)).expect("subject");
        b.set_issuer_name(self.ca_cert.subject_name())
            .expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&nb).expect("not_before");
        b.set_not_after(&na).expect("not_after");
        b.append_extension(BasicConstraints::new().critical().build().expect("bc"))
            .expect("bc");
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .build()
                .expect("ku"),
        )
        .expect("ku");
        let mut eku = ExtendedKeyUsage::new();
        if server {
            eku.server_auth();
        } else {
            eku.client_auth();
        }
        b.append_extension(eku.build().expect("eku")).expect("eku");
        if !sans.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for s in sans {
                if s.parse::<IpAddr>().is_ok() {
                    san.ip(s);
                } else {
                    san.dns(s);
                }
            }
            let ext = san
                .build(&b.x509v3_context(Some(&self.ca_cert), None))
                .expect("san");
            b.append_extension(ext).expect("san");
        }
        let skid = SubjectKeyIdentifier::new()
            .build(&b.x509v3_context(Some(&self.ca_cert), None))
            .expect("skid");
        b.append_extension(skid).expect("skid");
        let akid = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(&self.ca_cert), None))
            .expect("akid");
        b.append_extension(akid).expect("akid");
        b.sign(&self.ca_key, MessageDigest::sha256())
            .expect("sign leaf");
        self.save(kind, cn, &b.build(), &key, serial_hex)
    }

    /// Writes a leaf this CA signed (followed by the CA, as its chain) and
    /// its key under unique file names.
    fn save(
        &self,
        kind: &str,
        cn: &str,
        cert: &X509,
        key: &PKey<Private>,
        serial_hex: String,
    ) -> CertFiles {
        let leaf_pem = String::from_utf8(cert.to_pem().expect("pem")).expect("utf8 pem");
        let cert_pem = format!("{leaf_pem}{}", self.ca_pem);
        let key_pem =
            String::from_utf8(key.private_key_to_pem_pkcs8().expect("pkcs8")).expect("utf8 pem");
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let stem = format!("{}-{kind}-{n}-{}", sanitize(&self.name), sanitize(cn));
        let cert_path = self.dir.join(format!("{stem}.crt"));
        let key_path = self.dir.join(format!("{stem}.key"));
        fs::write(&cert_path, &cert_pem).expect("write cert");
        fs::write(&key_path, &key_pem).expect("write key");
        CertFiles {
            cert: cert_path,
            key: key_path,
            cert_pem,
            key_pem,
            leaf_pem,
            serial_hex,
            subject_cn: cn.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------
// pingress-echo
// ---------------------------------------------------------------------------

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
        let mut child = Command::new(PINGRESS_ECHO)
            .arg("--listen")
            .arg(listen)
            .arg("--name")
            .arg(name)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {PINGRESS_ECHO}: {e}"));

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

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------

/// The system nginx as an upstream, confined to a temp dir, killed on drop.
/// Every request gets `200 hello from nginx` plus `x-client-dn` and
/// `x-client-verify` headers describing the client certificate.
pub struct Nginx {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Nginx {
    pub fn plain() -> Nginx {
        Nginx::start("", None)
    }

    /// Cleartext HTTP/2 with prior knowledge (h2c), as gRPC upstreams speak.
    pub fn h2c() -> Nginx {
        Nginx::start(" http2", None)
    }

    /// TLS with the given server certificate, no client verification.
    pub fn tls(server: &CertFiles) -> Nginx {
        Nginx::start(
            "",
            Some(format!(
                "ssl_certificate {};\n        ssl_certificate_key {};",
                server.cert.display(),
                server.key.display()
            )),
        )
    }

    /// TLS that demands a client certificate issued by `ca`
    /// (`ssl_verify_client on`: nginx answers 400 without one).
    pub fn mtls(server: &CertFiles, ca: &Path) -> Nginx {
        Nginx::start(
            "",
            Some(format!(
                "ssl_certificate {};\n        ssl_certificate_key {};\n        \
             ssl_client_certificate {};\n        ssl_verify_client on;\n        \
             ssl_verify_depth 2;",
                server.cert.display(),
                server.key.display(),
                ca.display()
            )),
        )
    }

    /// nginx serving `files` (path under its root, content) as static
    /// files, with its own path handling: it resolves `..`, `%2e%2e` and
    /// `..%2f` before it looks for a file, as real upstreams do.
    pub fn static_files(files: &[(&str, &str)]) -> Nginx {
        let nginx = Nginx::start_serving("", None, Serve::Root);
        let root = nginx.dir.path().join("root");
        for (path, content) in files {
            let file = root.join(path);
            fs::create_dir_all(file.parent().expect("a file has a directory"))
                .expect("create the static directory");
            fs::write(&file, content).expect("write a static file");
        }
        nginx
    }

    /// `listen` is appended to the listen directive (` http2`); `tls` holds
    /// the ssl directives.
    fn start(listen: &str, tls: Option<String>) -> Nginx {
        Nginx::start_serving(listen, tls, Serve::Hello)
    }

    fn start_serving(listen: &str, tls: Option<String>, serve: Serve) -> Nginx {
        if !Path::new(NGINX).exists() {
            panic!(
                "{NGINX} not found: these tests use the system nginx as an upstream; \
                 `.ci/run` installs it (apt-get install nginx-light or nginx)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("pingress-nginx-")
            .tempdir()
            .expect("nginx temp dir");
        let mut last_err = String::new();
        // free_port() is racy; retry a few times if someone grabbed the port.
        for _ in 0..5 {
            let port = free_port();
            match Nginx::try_start(&dir, port, listen, tls.as_deref(), serve) {
                Ok(child) => return Nginx { child, port, dir },
                Err((retry, err)) => {
                    last_err = err;
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("nginx failed to start:\n{last_err}");
    }

    fn try_start(
        dir: &TempDir,
        port: u16,
        listen_extra: &str,
        tls: Option<&str>,
        serve: Serve,
    ) -> Result<Child, (bool, String)> {
        let d = dir.path();
        let location = match serve {
            Serve::Hello => "add_header x-client-dn $ssl_client_s_dn always;\n            \
                             add_header x-client-verify $ssl_client_verify always;\n            \
                             return 200 \"hello from nginx\";"
                .to_string(),
            Serve::Root => format!("root {}/root;", d.display()),
        };
        let (listen, ssl) = match tls {
            Some(cfg) => (
                format!("127.0.0.1:{port} ssl{listen_extra}"),
                cfg.to_string(),
            ),
            None => (format!("127.0.0.1:{port}{listen_extra}"), String::new()),
        };
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    server {{
        listen {listen};
        {ssl}
        location / {{
            {location}
        }}
    }}
}}
"#,
            d = d.display()
        );
        let conf_path = d.join("nginx.conf");
        fs::write(&conf_path, conf).expect("write nginx.conf");
        let _ = fs::remove_file(d.join("error.log"));
        let stderr = fs::File::create(d.join("stderr.log")).expect("nginx stderr file");

        let mut child = Command::new(NGINX)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(&conf_path)
            // Errors before the config is read would otherwise go to the
            // compiled-in path, which a non-root test cannot open.
            .arg("-e")
            .arg(d.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| (false, format!("spawn {NGINX}: {e}")))?;

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = format!(
                    "exit {status}\n{}{}",
                    fs::read_to_string(d.join("stderr.log")).unwrap_or_default(),
                    fs::read_to_string(d.join("error.log")).unwrap_or_default()
                );
                let retry = log.contains("Address already in use");
                return Err((retry, log));
            }
            if port_open(port) {
                return Ok(child);
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                return Err((
                    false,
                    format!(
                        "port {port} not open after 10 s\n{}",
                        fs::read_to_string(d.join("error.log")).unwrap_or_default()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// What the harness's nginx answers.
#[derive(Clone, Copy)]
enum Serve {
    /// `hello from nginx`, with the client certificate it saw in headers.
    Hello,
    /// The files under its `root` directory.
    Root,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// The system redis-server on a loopback port, without persistence, killed
/// on drop. `stop` and `restart` (same port) let tests show what the
/// gateway does while Redis is away.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        if !Path::new(REDIS_SERVER).exists() {
            panic!(
                "{REDIS_SERVER} not found: the shared rate-limit tests need a real Redis; \
                 scripts/bootstrap installs it (apt-get install redis-server)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("pingress-redis-")
            .tempdir()
            .expect("redis temp dir");
        let mut last_err = String::new();
        // free_port() is racy; try again if someone took the port.
        for _ in 0..5 {
            let port = free_port();
            match Redis::spawn(dir.path(), port) {
                Ok(child) => {
                    return Redis {
                        child: Some(child),
                        port,
                        dir,
                    }
                }
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server failed to start:\n{last_err}");
    }

    fn spawn(dir: &Path, port: u16) -> Result<Child, String> {
        let log = dir.join("redis.log");
        let mut child = Command::new(REDIS_SERVER)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {REDIS_SERVER}: {e}"))?;
        let up = poll_until(Duration::from_secs(10), || {
            port_open(port) || matches!(child.try_wait(), Ok(Some(_)))
        });
        if up && matches!(child.try_wait(), Ok(None)) {
            return Ok(child);
        }
        kill_child(&mut child);
        Err(fs::read_to_string(&log).unwrap_or_default())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server; its counters are gone with it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts a fresh server on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let child = Redis::spawn(self.dir.path(), self.port)
            .unwrap_or_else(|e| panic!("redis-server did not come back on {}:\n{e}", self.port));
        self.child = Some(child);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// pingress itself
// ---------------------------------------------------------------------------

/// Writes `dir/gateway.yaml` and `dir/resources/test.yaml` (an HTTP Listener
/// on `listener_port` followed by `resources_yaml`).
pub fn write_gateway(dir: &Path, listener_port: u16, admin_port: u16, resources_yaml: &str) {
    write_gateway_with_listener(dir, listener_port, admin_port, "", resources_yaml);
}

/// Like [`write_gateway`], with `listener_extra` (block YAML at the level of
/// the Listener's `spec` keys, e.g. `"l7Depth: 1"`) added to the Listener.
pub fn write_gateway_with_listener(
    dir: &Path,
    listener_port: u16,
    admin_port: u16,
    listener_extra: &str,
    resources_yaml: &str,
) {
    // JSON strings are valid YAML double-quoted scalars, so odd temp paths
    // cannot break the document.
    let q = |p: PathBuf| serde_json::to_string(&p.to_string_lossy()).expect("quote path");
    let gateway = format!(
        "pingora:\n  threads: 1\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n  \
         upgrade_sock: {}\n  pid_file: {}\nresources:\n  - resources\nadmin:\n  listen: 127.0.0.1:{admin_port}\n",
        q(dir.join("upgrade.sock")),
        q(dir.join("pingress.pid")),
    );
    fs::create_dir_all(dir.join("resources")).expect("create resources dir");
    fs::write(dir.join("gateway.yaml"), gateway).expect("write gateway.yaml");

    let mut resources = format!(
        "apiVersion: getambassador.io/v3alpha1\nkind: Listener\nmetadata:\n  name: http\nspec:\n  \
         port: {listener_port}\n  protocol: HTTP\n  securityModel: XFP\n  hostBinding:\n    \
         namespace:\n      from: ALL\n"
    );
    for line in listener_extra.lines().filter(|l| !l.trim().is_empty()) {
        resources.push_str(&format!("  {line}\n"));
    }
    let extra = resources_yaml.trim_start_matches('\n');
    if !extra.trim().is_empty() {
        if !extra.starts_with("---") {
            resources.push_str("---\n");
        }
        resources.push_str(extra);
        if !extra.ends_with('\n') {
            resources.push('\n');
        }
    }
    fs::write(dir.join("resources").join("test.yaml"), resources).expect("write test.yaml");
}

/// Result of a short-lived pingress invocation.
#[derive(Debug)]
pub struct Output {
    /// Exit code; -1 if killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// stdout followed by stderr, for "the message appears somewhere" checks.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// `pingress -t -c <dir>/gateway.yaml`: validate the configuration only.
pub fn check(dir: &Path) -> Output {
    check_program(Path::new(PINGRESS), dir)
}

/// `-t` with another pingress binary, e.g. an example with its own filters.
pub fn check_program(program: &Path, dir: &Path) -> Output {
    let out = Command::new(program)
        .arg("-t")
        .arg("-c")
        .arg(dir.join("gateway.yaml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {} -t: {e}", program.display()));
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn admin_addr_from(gateway_yaml: &Path) -> SocketAddr {
    let text = fs::read_to_string(gateway_yaml)
        .unwrap_or_else(|e| panic!("read {}: {e}", gateway_yaml.display()));
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("parse {}: {e}", gateway_yaml.display()));
    let listen = doc
        .get("admin")
        .and_then(|a| a.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or_else(|| panic!("{} has no admin.listen", gateway_yaml.display()));
    listen
        .parse()
        .unwrap_or_else(|e| panic!("admin.listen {listen:?}: {e}"))
}

/// A ready gateway on `resources` behind an HTTP Listener (`listener_extra`
/// adds lines to it, e.g. `"l7Depth: 1"`), with the directory that holds its
/// files (removed when dropped) and the listener's port.
pub fn start_gateway(listener_extra: &str, resources: &str) -> (TempDir, Gateway, u16) {
    start_gateway_program(Path::new(PINGRESS), listener_extra, resources)
}

/// [`start_gateway`] with another pingress binary (see [`example_binary`]).
pub fn start_gateway_program(
    program: &Path,
    listener_extra: &str,
    resources: &str,
) -> (TempDir, Gateway, u16) {
    let dir = tempdir();
    let port = free_port();
    write_gateway_with_listener(dir.path(), port, free_port(), listener_extra, resources);
    let gateway = Gateway::start_program(program, dir.path());
    (dir, gateway, port)
}

/// The binary of `examples/<name>.rs`, which `cargo test` builds beside
/// the test binaries.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>/examples/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let binary = profile_dir.join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds the examples (or run `cargo build --examples`)",
        binary.display()
    );
    binary
}

/// A running `pingress -c <dir>/gateway.yaml`, killed (SIGKILL) on drop.
pub struct Gateway {
    child: Child,
    dir: PathBuf,
    admin: SocketAddr,
    log: PathBuf,
}

impl Gateway {
    /// Starts the gateway on an already written `dir/gateway.yaml` and waits
    /// (20 s) until `/ambassador/v0/check_ready` answers 200.
    pub fn start(dir: &Path) -> Gateway {
        Gateway::start_program(Path::new(PINGRESS), dir)
    }

    /// Like [`Gateway::start`], with another pingress binary (an example
    /// with its own filters, see [`example_binary`]).
    pub fn start_program(program: &Path, dir: &Path) -> Gateway {
        let mut gw = Gateway::spawn_program(program, dir, &[], "gateway.log");
        gw.wait_ready(Duration::from_secs(20));
        gw
    }

    /// Starts `pingress -c <dir>/gateway.yaml <extra>` with its output in
    /// `dir/<log>`, without waiting for it (a `-u` process waits for the old
    /// one's sockets).
    pub fn spawn(dir: &Path, extra: &[&str], log: &str) -> Gateway {
        Gateway::spawn_program(Path::new(PINGRESS), dir, extra, log)
    }

    fn spawn_program(program: &Path, dir: &Path, extra: &[&str], log: &str) -> Gateway {
        let config = dir.join("gateway.yaml");
        let admin = admin_addr_from(&config);
        let log_path = dir.join(log);
        let log = fs::File::create(&log_path).expect("create the gateway log");
        let log2 = log.try_clone().expect("clone log handle");
        let child = Command::new(program)
            .arg("-c")
            .arg(&config)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Gateway {
            child,
            dir: dir.to_path_buf(),
            admin,
            log: log_path,
        }
    }

    /// Polls check_ready until 200; panics with the log if the process exits
    /// or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "pingress exited ({status}) before becoming ready; log:\n{}",
                    self.log()
                );
            }
            let ready = Request::get("/ambassador/v0/check_ready")
                .timeout(Duration::from_secs(2))
                .try_send(self.admin.port())
                .map(|r| r.status == 200)
                .unwrap_or(false);
            if ready {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pingress not ready after {timeout:?} (admin {}); log:\n{}",
                    self.admin,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything pingress wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.port()
    }

    /// GET on the admin listener.
    pub fn admin_get(&self, path: &str) -> Response {
        Request::get(path).send(self.admin.port())
    }

    /// The value of one series of `/metrics`, e.g.
    /// `pingress_config_generation` or `name{label="value"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let response = self.admin_get("/metrics");
        assert_eq!(response.status, 200, "{}", response.text());
        response.text().lines().find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
    }

    /// The gateway's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the gateway's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 client
// ---------------------------------------------------------------------------

/// One HTTP/1.1 request, written byte for byte as given: the target is never
/// normalized, and `Host` is added only when the caller gave none and did
/// not ask for `no_host()`.
#[derive(Clone, Debug)]
pub struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    host: bool,
    timeout: Duration,
    /// The client's own address (a loopback address other than 127.0.0.1).
    source: Option<std::net::IpAddr>,
}

impl Request {
    pub fn new(method: &str, target: &str) -> Request {
        Request {
            method: method.to_string(),
            target: target.to_string(),
            headers: Vec::new(),
            body: None,
            host: true,
            timeout: READ_TIMEOUT,
            source: None,
        }
    }

    pub fn get(target: &str) -> Request {
        Request::new("GET", target)
    }

    pub fn post(target: &str, body: impl Into<Vec<u8>>) -> Request {
        Request::new("POST", target).body(body)
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn headers(mut self, headers: &[(&str, &str)]) -> Request {
        for (n, v) in headers {
            self.headers.push((n.to_string(), v.to_string()));
        }
        self
    }

    /// Send no Host header at all.
    pub fn no_host(mut self) -> Request {
        self.host = false;
        self
    }

    /// Request body. `Content-Length` is added unless the caller set
    /// `Content-Length` or `Transfer-Encoding` (then the bytes are sent
    /// as-is, e.g. pre-encoded chunks).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = Some(body.into());
        self
    }

    /// Connect from `ip` (e.g. 127.0.0.7), as another client would.
    pub fn source_ip(mut self, ip: &str) -> Request {
        self.source = Some(ip.parse().expect("a client IP address"));
        self
    }

    /// Read timeout for the response (default 10 s).
    pub fn timeout(mut self, t: Duration) -> Request {
        self.timeout = t;
        self
    }

    fn has(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The bytes on the wire. `close` adds `Connection: close` unless the
    /// caller set a Connection header.
    pub fn to_bytes(&self, default_host: &str, close: bool) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        if self.host && !self.has("host") {
            out.push_str(&format!("Host: {default_host}\r\n"));
        }
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(b) = &self.body {
            if !self.has("content-length") && !self.has("transfer-encoding") {
                out.push_str(&format!("Content-Length: {}\r\n", b.len()));
            }
        }
        if close && !self.has("connection") {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if let Some(b) = &self.body {
            bytes.extend_from_slice(b);
        }
        bytes
    }

    /// Sends on a fresh connection to 127.0.0.1:`port`; panics on I/O errors.
    pub fn send(self, port: u16) -> Response {
        let desc = format!("{} {} to port {port}", self.method, self.target);
        self.try_send(port)
            .unwrap_or_else(|e| panic!("{desc}: {e}"))
    }

    pub fn try_send(self, port: u16) -> io::Result<Response> {
        let stream = match self.source {
            Some(ip) => connect_from(port, ip)?,
            None => connect(port)?,
        };
        stream.set_read_timeout(Some(self.timeout))?;
        let mut wire = Wire::new(stream);
        let bytes = self.to_bytes(&format!("127.0.0.1:{port}"), true);
        wire.stream.write_all(&bytes)?;
        wire.stream.flush()?;
        wire.read_response(self.method.eq_ignore_ascii_case("HEAD"))
    }

    /// Sends over TLS on a fresh connection; `Host` defaults to the SNI.
    pub fn try_send_tls(self, port: u16, tls: &TlsOpts) -> Result<Response, String> {
        let stream = tls_connect(port, tls)?;
        let host = tls
            .sni
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{port}"));
        let mut wire = Wire::new(stream);
        let bytes = self.to_bytes(&host, true);
        let head = self.method.eq_ignore_ascii_case("HEAD");
        wire.stream
            .write_all(&bytes)
            .and_then(|_| wire.stream.flush())
            .and_then(|_| wire.read_response(head))
            .map_err(|e| format!("TLS request to port {port}: {e}"))
    }

    pub fn send_tls(self, port: u16, tls: &TlsOpts) -> Response {
        self.try_send_tls(port, tls)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

fn connect(port: u16) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(READ_TIMEOUT))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Like [`connect`], from the client address `ip`.
fn connect_from(port: u16, ip: std::net::IpAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)).into(),
        Duration::from_secs(5),
    )?;
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(READ_TIMEOUT))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// `GET`-style one-shot request with `Connection: close`.
pub fn request(port: u16, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
    Request::new(method, target).headers(headers).send(port)
}

/// Writes `bytes` verbatim and parses one response, for malformed-request
/// tests.
pub fn send_raw(port: u16, bytes: &[u8]) -> io::Result<Response> {
    let mut wire = Wire::new(connect(port)?);
    wire.stream.write_all(bytes)?;
    wire.stream.flush()?;
    wire.read_response(false)
}

/// Writes `bytes` verbatim and returns everything read until EOF or
/// `timeout`, unparsed.
pub fn raw_exchange(port: u16, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let Ok(mut s) = connect(port) else {
        return out;
    };
    let _ = s.set_read_timeout(Some(timeout));
    if s.write_all(bytes).is_err() {
        return out;
    }
    let _ = s.read_to_end(&mut out);
    out
}

/// A response as read off the wire.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header with this name, case-insensitive.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as a pingress-echo reply; panics (showing the
    /// response) if it is not one.
    pub fn echo(&self) -> EchoReply {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(json) if json.get("connection").is_some() => EchoReply { json },
            _ => panic!(
                "not an echo reply: {} {:?}\n{}",
                self.status,
                self.headers,
                self.text()
            ),
        }
    }

    /// The echo reply of a 200; panics, showing the response, on anything
    /// else (an upstream's error status included).
    pub fn echo_ok(&self) -> EchoReply {
        assert_eq!(
            self.status,
            200,
            "{} {:?}\n{}",
            self.reason,
            self.headers,
            self.text()
        );
        self.echo()
    }
}

/// Anything a request can be written to: TCP or TLS-over-TCP.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A stream plus read-ahead buffer, so keep-alive responses are split
/// exactly at their boundaries.
struct Wire<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: Read + Write> Wire<S> {
    fn new(stream: S) -> Self {
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn fill_or_eof(&mut self, what: &str) -> io::Result<()> {
        if self.fill()? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed while reading {what}"),
            ));
        }
        Ok(())
    }

    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            self.fill_or_eof("chunked body")?;
        }
    }

    fn read_exact_buf(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill_or_eof("body")?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        loop {
            let mut resp = self.read_head()?;
            let status = resp.status;
            // Interim responses (100 Continue, 103) precede the real one.
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let headers = &resp.headers;
            let te_chunked = headers.iter().any(|(n, v)| {
                n.eq_ignore_ascii_case("transfer-encoding")
                    && v.to_ascii_lowercase().contains("chunked")
            });
            let cl = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim().parse::<usize>());
            let body = if head_request || status == 204 || status == 304 || status == 101 {
                Vec::new()
            } else if te_chunked {
                self.read_chunked()?
            } else if let Some(cl) = cl {
                let n = cl.map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("content-length: {e}"))
                })?;
                self.read_exact_buf(n)?
            } else {
                while self.fill()? > 0 {}
                std::mem::take(&mut self.buf)
            };
            resp.body = body;
            return Ok(resp);
        }
    }

    /// The status line and headers, as a `Response` with an empty body.
    fn read_head(&mut self) -> io::Result<Response> {
        loop {
            if !self.buf.is_empty() {
                let mut slots = [httparse::EMPTY_HEADER; 128];
                let mut resp = httparse::Response::new(&mut slots);
                match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let status = resp.code.unwrap_or(0);
                        let reason = resp.reason.unwrap_or_default().to_string();
                        let headers = resp
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_string(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect();
                        self.buf.drain(..len);
                        return Ok(Response {
                            status,
                            reason,
                            headers,
                            body: Vec::new(),
                        });
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "malformed response head ({e}): {:?}",
                                String::from_utf8_lossy(&self.buf)
                            ),
                        ))
                    }
                }
            }
            self.fill_or_eof("response head")?;
        }
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let line = String::from_utf8_lossy(&line);
            let size_str = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_str, 16).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("chunk size {line:?}: {e}"),
                )
            })?;
            if size == 0 {
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.read_exact_buf(size)?);
            self.read_line()?;
        }
    }
}

/// Several requests over one connection (no `Connection: close` added).
pub struct Client {
    wire: Wire<Box<dyn Stream>>,
    default_host: String,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let s = connect(port).unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
        Client {
            wire: Wire::new(Box::new(s)),
            default_host: format!("127.0.0.1:{port}"),
        }
    }

    pub fn connect_tls(port: u16, tls: &TlsOpts) -> Client {
        let s = tls_connect(port, tls).unwrap_or_else(|e| panic!("{e}"));
        Client {
            wire: Wire::new(Box::new(s)),
            default_host: tls
                .sni
                .clone()
                .unwrap_or_else(|| format!("127.0.0.1:{port}")),
        }
    }

    pub fn try_send(&mut self, req: Request) -> io::Result<Response> {
        let bytes = req.to_bytes(&self.default_host, false);
        self.wire.stream.write_all(&bytes)?;
        self.wire.stream.flush()?;
        self.wire
            .read_response(req.method.eq_ignore_ascii_case("HEAD"))
    }

    pub fn send(&mut self, req: Request) -> Response {
        let desc = format!("{} {}", req.method, req.target);
        self.try_send(req)
            .unwrap_or_else(|e| panic!("keep-alive {desc}: {e}"))
    }

    pub fn get(&mut self, target: &str) -> Response {
        self.send(Request::get(target))
    }

    /// True if the server has closed the connection (reads EOF or an error
    /// with nothing buffered).
    pub fn is_closed(&mut self) -> bool {
        if !self.wire.buf.is_empty() {
            return false;
        }
        matches!(self.wire.fill(), Ok(0) | Err(_))
    }
}

// ---------------------------------------------------------------------------
// TLS client
// ---------------------------------------------------------------------------

/// How to connect over TLS: trusted CA, SNI, name to verify, client cert.
#[derive(Clone, Debug)]
pub struct TlsOpts {
    pub ca: PathBuf,
    /// SNI to send; `None` sends none (IP addresses are never sent as SNI).
    pub sni: Option<String>,
    /// Name the server certificate must match; `None` skips the name check
    /// (the chain is still verified against `ca`).
    pub verify_name: Option<String>,
    pub client: Option<CertFiles>,
    /// ALPN protocols to offer; empty offers none.
    pub alpn: Vec<String>,
}

impl TlsOpts {
    /// Sends `sni` and verifies the server certificate for it.
    pub fn new(ca: &Path, sni: &str) -> TlsOpts {
        TlsOpts {
            ca: ca.to_path_buf(),
            sni: Some(sni.to_string()),
            verify_name: Some(sni.to_string()),
            client: None,
            alpn: vec!["http/1.1".to_string()],
        }
    }

    pub fn client(mut self, cert: &CertFiles) -> TlsOpts {
        self.client = Some(cert.clone());
        self
    }

    pub fn no_sni(mut self) -> TlsOpts {
        self.sni = None;
        self
    }

    pub fn verify_name(mut self, name: Option<&str>) -> TlsOpts {
        self.verify_name = name.map(str::to_string);
        self
    }

    pub fn alpn(mut self, protos: &[&str]) -> TlsOpts {
        self.alpn = protos.iter().map(|p| p.to_string()).collect();
        self
    }
}

/// Connects and completes the TLS handshake. Errors are strings because
/// the useful detail is OpenSSL's error stack.
pub fn tls_connect(port: u16, opts: &TlsOpts) -> Result<SslStream<TcpStream>, String> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
    b.set_ca_file(&opts.ca)
        .map_err(|e| format!("load CA {}: {e}", opts.ca.display()))?;
    if let Some(c) = &opts.client {
        b.set_certificate_chain_file(&c.cert)
            .map_err(|e| format!("load {}: {e}", c.cert.display()))?;
        b.set_private_key_file(&c.key, SslFiletype::PEM)
            .map_err(|e| format!("load {}: {e}", c.key.display()))?;
    }
    if !opts.alpn.is_empty() {
        let mut wire = Vec::new();
        for p in &opts.alpn {
            wire.push(p.len() as u8);
            wire.extend_from_slice(p.as_bytes());
        }
        b.set_alpn_protos(&wire).map_err(|e| e.to_string())?;
    }
    let connector = b.build();
    let mut cfg = connector.configure().map_err(|e| e.to_string())?;
    // SNI and the verified name are set separately so tests can send one
    // and check the other (or omit either).
    cfg.set_use_server_name_indication(false);
    cfg.set_verify_hostname(opts.verify_name.is_some());
    let mut ssl = cfg
        .into_ssl(opts.verify_name.as_deref().unwrap_or(""))
        .map_err(|e| e.to_string())?;
    if let Some(sni) = &opts.sni {
        if sni.parse::<IpAddr>().is_err() {
            ssl.set_hostname(sni).map_err(|e| e.to_string())?;
        }
    }
    let tcp = connect(port).map_err(|e| format!("connect to port {port}: {e}"))?;
    ssl.connect(tcp)
        .map_err(|e| format!("TLS handshake with port {port}: {e}"))
}

/// GET `path` over TLS (SNI and verified name `sni`, trusting `ca`,
/// optionally presenting `client`); panics on any failure.
pub fn tls_request(
    port: u16,
    sni: &str,
    ca: &Path,
    client: Option<&CertFiles>,
    path: &str,
) -> Response {
    try_tls_request(port, sni, ca, client, path).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`tls_request`] but returns handshake and read failures, for tests
/// that expect them (e.g. a TLS 1.3 server rejecting the client cert only
/// surfaces on the first read).
pub fn try_tls_request(
    port: u16,
    sni: &str,
    ca: &Path,
    client: Option<&CertFiles>,
    path: &str,
) -> Result<Response, String> {
    let mut opts = TlsOpts::new(ca, sni);
    if let Some(c) = client {
        opts = opts.client(c);
    }
    Request::get(path).try_send_tls(port, &opts)
}

// ---------------------------------------------------------------------------
// pingress-echo replies
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Secrets and one-shot pingress runs (used by tests/check.rs and
// tests/failures.rs)
// ---------------------------------------------------------------------------

/// A `kubernetes.io/tls` Secret `default/<name>` whose `stringData` holds
/// the given entries (PEM text as YAML block scalars), as one YAML document.
pub fn secret_yaml(name: &str, entries: &[(&str, &str)]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: default\n\
         type: kubernetes.io/tls\nstringData:\n"
    );
    for (key, value) in entries {
        out.push_str(&format!("  {key}: |\n"));
        for line in value.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// Runs `pingress <args>` to completion, killing it after `timeout`.
/// Returns its output (code -1 when it had to be killed) and how long it ran.
pub fn run_pingress<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    timeout: Duration,
) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = Command::new(PINGRESS)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {PINGRESS}: {e}"));
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let readers = [
        child
            .stdout
            .take()
            .map(|s| drain_to_string(s, Arc::clone(&stdout))),
        child
            .stderr
            .take()
            .map(|s| drain_to_string(s, Arc::clone(&stderr))),
    ];
    let mut code = -1;
    let deadline = started + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            code = status.code().unwrap_or(-1);
            break;
        }
        if Instant::now() >= deadline {
            kill_child(&mut child);
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    for reader in readers.into_iter().flatten() {
        let _ = reader.join();
    }
    let text = |s: &Arc<Mutex<String>>| s.lock().map(|s| s.clone()).unwrap_or_default();
    (
        Output {
            code,
            stdout: text(&stdout),
            stderr: text(&stderr),
        },
        elapsed,
    )
}

// ---------------------------------------------------------------------------
// Edge TLS helpers (used by tests/edge_tls.rs)
// ---------------------------------------------------------------------------

/// Like [`write_gateway`] without the implicit HTTP Listener:
/// `resources_yaml` brings every Listener the test wants (e.g. only HTTPS).
pub fn write_gateway_without_listener(dir: &Path, admin_port: u16, resources_yaml: &str) {
    write_gateway(dir, 0, admin_port, "");
    fs::write(dir.join("resources").join("test.yaml"), resources_yaml).expect("write test.yaml");
}

impl Pki {
    /// A serverAuth certificate for `name` (CN and DNS SAN) valid from
    /// `not_before` to `not_after`, in seconds since the Unix epoch; with a
    /// `not_after` in the past it is an expired certificate.
    pub fn issue_server_valid(&self, name: &str, not_before: i64, not_after: i64) -> CertFiles {
        let key = new_ec_key();
        let (serial, serial_hex) = random_serial();
        let mut b = X509::builder().expect("x509 builder");
        b.set_version(2).expect("version");
        b.set_serial_number(&serial).expect("serial");
        b.set_subject_name(&subject_name(name)).expect("subject");
        b.set_issuer_name(self.ca_cert.subject_name())
            .expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&Asn1Time::from_unix(not_before).expect("not_before"))
            .expect("not_before");
        b.set_not_after(&Asn1Time::from_unix(not_after).expect("not_after"))
            .expect("not_after");
        let mut eku = ExtendedKeyUsage::new();
        b.append_extension(eku.server_auth().build().expect("eku"))
            .expect("eku");
        let san = SubjectAlternativeName::new()
            .dns(name)
            .build(&b.x509v3_context(Some(&self.ca_cert), None))
            .expect("san");
        b.append_extension(san).expect("san");
        b.sign(&self.ca_key, MessageDigest::sha256())
            .expect("sign leaf");
        self.save("dated", name, &b.build(), &key, serial_hex)
    }
}

impl Request {
    /// Like [`Request::try_send_tls`], also returning the leaf certificate
    /// the server presented on that connection.
    pub fn try_send_tls_peer(self, port: u16, tls: &TlsOpts) -> Result<(Response, X509), String> {
        let stream = tls_connect(port, tls)?;
        let peer = stream
            .ssl()
            .peer_certificate()
            .ok_or_else(|| format!("TLS on port {port}: the server presented no certificate"))?;
        let host = tls
            .sni
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{port}"));
        let mut wire = Wire::new(stream);
        let bytes = self.to_bytes(&host, true);
        let head = self.method.eq_ignore_ascii_case("HEAD");
        wire.stream
            .write_all(&bytes)
            .and_then(|_| wire.stream.flush())
            .and_then(|_| wire.read_response(head))
            .map(|response| (response, peer))
            .map_err(|e| format!("TLS request to port {port}: {e}"))
    }
}

// ---------------------------------------------------------------------------
// Resource YAML builders (used by tests/edge_tls.rs and
// tests/client_identity.rs)
// ---------------------------------------------------------------------------

pub const V3: &str = "getambassador.io/v3alpha1";

/// `text` with every non-blank line indented by `by` spaces.
pub fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{pad}{l}\n"))
        .collect()
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
pub fn q(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes as JSON")
}

/// One v3 resource; `metadata` is the inside of a flow map, `spec` block
/// YAML at the level of the spec's keys.
/// The `ambassador` Module with `config` (block YAML under `spec.config`).
pub fn module(config: &str) -> String {
    doc(
        "Module",
        "name: ambassador",
        &format!("config:\n{}", indent(config, 2)),
    )
}

pub fn doc(kind: &str, metadata: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: {V3}\nkind: {kind}\nmetadata: {{{metadata}}}\nspec:\n{}",
        indent(spec, 2)
    )
}

/// A Secret of `kind` (`kubernetes.io/tls`, `Opaque`) whose `stringData`
/// holds `entries` (key, text) as YAML block scalars.
fn secret_doc(name: &str, namespace: &str, kind: &str, entries: &[(&str, &str)]) -> String {
    let mut out = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {}, namespace: {namespace}}}\n\
         type: {kind}\nstringData:\n",
        q(name)
    );
    for (key, text) in entries {
        out.push_str(&format!("  {key}: |\n{}", indent(text, 4)));
    }
    out
}

/// A `kubernetes.io/tls` Secret with a certificate chain and its key.
pub fn tls_secret(name: &str, namespace: &str, cert: &CertFiles) -> String {
    secret_doc(
        name,
        namespace,
        "kubernetes.io/tls",
        &[("tls.crt", &cert.cert_pem), ("tls.key", &cert.key_pem)],
    )
}

/// An Opaque Secret with these `stringData` entries, e.g. `crl.pem`.
pub fn opaque_secret(name: &str, namespace: &str, entries: &[(&str, &str)]) -> String {
    secret_doc(name, namespace, "Opaque", entries)
}

/// An Opaque Secret holding a CA bundle under `tls.crt`, as Emissary reads it.
pub fn ca_secret(name: &str, namespace: &str, ca_pem: &str) -> String {
    opaque_secret(name, namespace, &[("tls.crt", ca_pem)])
}

/// A Listener with securityModel XFP that binds Hosts of every namespace.
pub fn listener(name: &str, port: u16, protocol: &str) -> String {
    doc(
        "Listener",
        &format!("name: {name}"),
        &format!(
            "port: {port}\nprotocol: {protocol}\nsecurityModel: XFP\n\
             hostBinding:\n  namespace:\n    from: ALL"
        ),
    )
}

/// A Host for `hostname`; `extra` is block YAML at the level of its spec.
pub fn host(name: &str, hostname: &str, extra: &str) -> String {
    doc(
        "Host",
        &format!("name: {}", q(name)),
        &format!("hostname: {}\n{extra}", q(hostname)),
    )
}

/// `tlsSecret` plus `requestPolicy.insecure.action` (`None`: the default).
pub fn tls_spec(secret: &str, action: Option<&str>) -> String {
    let policy = action
        .map(|a| format!("requestPolicy:\n  insecure:\n    action: {a}\n"))
        .unwrap_or_default();
    format!("tlsSecret:\n  name: {}\n{policy}", q(secret))
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

/// A Kubernetes object: `metadata` is the inside of a flow map, `body`
/// block YAML at the top level (`subsets:`, `endpoints:`, `spec:`).
pub fn kube_doc(api_version: &str, kind: &str, metadata: &str, body: &str) -> String {
    format!("---\napiVersion: {api_version}\nkind: {kind}\nmetadata: {{{metadata}}}\n{body}")
}

/// A core/v1 Endpoints `default/<name>`: `ready` and `not_ready` pods on
/// their shared port.
pub fn endpoints(name: &str, ready: &[&Echo], not_ready: &[&Echo]) -> String {
    let port = ready
        .iter()
        .chain(not_ready)
        .map(|e| e.port())
        .next()
        .unwrap_or(80);
    let list = |pods: &[&Echo]| -> String {
        match pods {
            [] => " []\n".to_string(),
            _ => pods
                .iter()
                .map(|e| format!("\n  - ip: {}", e.addr().ip()))
                .chain(["\n".to_string()])
                .collect(),
        }
    };
    kube_doc(
        "v1",
        "Endpoints",
        &format!("name: {name}, namespace: default"),
        &format!(
            "subsets:\n- addresses:{}  notReadyAddresses:{}  ports:\n  - name: http\n    port: {port}\n",
            list(ready),
            list(not_ready)
        ),
    )
}

/// A discovery.k8s.io/v1 EndpointSlice `default/<name>` of Service
/// `service`; each pod with its `ready` condition.
pub fn endpoint_slice(name: &str, service: &str, pods: &[(&Echo, bool)]) -> String {
    let port = pods.first().map(|(e, _)| e.port()).unwrap_or(80);
    let endpoints: String = pods
        .iter()
        .map(|(e, ready)| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: {ready}}}\n",
                e.addr().ip()
            )
        })
        .collect();
    kube_doc(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        &format!(
            "name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}"
        ),
        &format!(
            "addressType: IPv4\nendpoints:\n{endpoints}ports:\n- name: http\n  port: {port}\n"
        ),
    )
}

/// A Mapping of `prefix` to `echo`; `metadata_extra` is appended inside the
/// metadata flow map (`, labels: {..}`), `extra` are spec lines.
pub fn mapping(name: &str, metadata_extra: &str, prefix: &str, echo: &Echo, extra: &str) -> String {
    doc(
        "Mapping",
        &format!("name: {name}{metadata_extra}"),
        &format!(
            "prefix: {}\nservice: 127.0.0.1:{}\n{extra}",
            q(prefix),
            echo.port()
        ),
    )
}

// ---------------------------------------------------------------------------
// Client identities and CRLs (used by tests/client_identity.rs)
// ---------------------------------------------------------------------------

/// What a client certificate says about its holder, for tests of what the
/// gateway tells upstreams about it (XFCC, `%DOWNSTREAM_PEER_*%`).
#[derive(Clone, Debug)]
pub struct ClientIdentity<'a> {
    /// Subject attributes by short name in DER order, least specific first
    /// (`("C", "US")` .. `("CN", "alice")`), so RFC 2253 reads them back
    /// in reverse.
    pub subject: &'a [(&'a str, &'a str)],
    /// URI SANs, in order.
    pub uris: &'a [&'a str],
    /// DNS SANs, in order.
    pub dns: &'a [&'a str],
    /// Validity bounds, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl CertFiles {
    /// The leaf certificate, parsed.
    pub fn leaf(&self) -> X509 {
        X509::from_pem(self.leaf_pem.as_bytes()).expect("leaf PEM parses")
    }
}

impl Pki {
    /// A clientAuth certificate with exactly this subject, these SANs (URIs
    /// first, then DNS names) and validity.
    pub fn issue_client_identity(&self, id: &ClientIdentity) -> CertFiles {
        let key = new_ec_key();
        let (serial, serial_hex) = random_serial();
        let mut name = X509Name::builder().expect("name builder");
        for (field, value) in id.subject {
            name.append_entry_by_text(field, value)
                .unwrap_or_else(|e| panic!("subject {field}={value}: {e}"));
        }
        let cn = id
            .subject
            .iter()
            .find(|(field, _)| *field == "CN")
            .map(|(_, value)| *value)
            .unwrap_or("client");

        let mut b = X509::builder().expect("x509 builder");
        b.set_version(2).expect("version");
        b.set_serial_number(&serial).expect("serial");
        b.set_subject_name(&name.build()).expect("subject");
        b.set_issuer_name(self.ca_cert.subject_name())
            .expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&Asn1Time::from_unix(id.not_before).expect("not_before"))
            .expect("not_before");
        b.set_not_after(&Asn1Time::from_unix(id.not_after).expect("not_after"))
            .expect("not_after");
        b.append_extension(BasicConstraints::new().critical().build().expect("bc"))
            .expect("bc");
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .build()
                .expect("ku"),
        )
        .expect("ku");
        let mut eku = ExtendedKeyUsage::new();
        b.append_extension(eku.client_auth().build().expect("eku"))
            .expect("eku");
        if !id.uris.is_empty() || !id.dns.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for uri in id.uris {
                san.uri(uri);
            }
            for dns in id.dns {
                san.dns(dns);
            }
            let ext = san
                .build(&b.x509v3_context(Some(&self.ca_cert), None))
                .expect("san");
            b.append_extension(ext).expect("san");
        }
        let akid = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(&self.ca_cert), None))
            .expect("akid");
        b.append_extension(akid).expect("akid");
        b.sign(&self.ca_key, MessageDigest::sha256())
            .expect("sign leaf");
        self.save("identity", cn, &b.build(), &key, serial_hex)
    }

    /// A CRL this CA signed, valid from an hour ago for 30 days, revoking
    /// `revoked` (which this CA issued), as PEM.
    pub fn crl_pem(&self, revoked: &[&CertFiles]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        let mut b = X509CrlBuilder::new().expect("CRL builder");
        b.set_issuer_name(self.ca_cert.subject_name())
            .expect("CRL issuer");
        b.set_last_update(&Asn1Time::from_unix(now - 3600).expect("time"))
            .expect("lastUpdate");
        b.set_next_update(&Asn1Time::from_unix(now + 30 * 86_400).expect("time"))
            .expect("nextUpdate");
        let akid = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(
                &X509::builder()
                    .expect("x509 builder")
                    .x509v3_context(Some(&self.ca_cert), None),
            )
            .expect("CRL akid");
        b.append_extension(akid).expect("CRL akid");
        let number = CrlNumber::new(BigNum::from_u32(1).expect("bignum")).expect("CRL number");
        b.append_extension(number.build().expect("CRL number"))
            .expect("CRL number");
        for cert in revoked {
            let mut entry = X509RevokedBuilder::new().expect("revoked entry");
            entry
                .set_serial_number(cert.leaf().serial_number())
                .expect("revoked serial");
            entry
                .set_revocation_date(&Asn1Time::from_unix(now - 60).expect("time"))
                .expect("revocation date");
            b.add_revoked(entry.build()).expect("add revoked");
        }
        b.sign(&self.ca_key, MessageDigest::sha256())
            .expect("sign CRL");
        let crl = b.build().expect("CRL");
        String::from_utf8(crl.to_pem().expect("CRL PEM")).expect("utf8 PEM")
    }
}

// ---------------------------------------------------------------------------
// Byte streams that are not HTTP (used by tests/tcp_mappings.rs)
// ---------------------------------------------------------------------------

/// A TCP upstream on 127.0.0.1 that speaks no HTTP: each connection is
/// read until the client ends its writing (half-close), then answered with
/// `<name>:<what was read>` and closed. So a reply proves that the end of
/// the client's stream crossed the gateway while the way back stayed open.
pub struct ByteEcho {
    addr: SocketAddr,
    name: String,
    stop: Arc<AtomicBool>,
}

impl ByteEcho {
    pub fn start(name: &str) -> ByteEcho {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (tag, stopping) = (name.to_string(), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let tag = tag.clone();
                thread::spawn(move || {
                    let mut read = Vec::new();
                    if conn.read_to_end(&mut read).is_ok() {
                        let mut reply = format!("{tag}:").into_bytes();
                        reply.extend_from_slice(&read);
                        let _ = conn.write_all(&reply);
                    }
                });
            }
        });
        ByteEcho {
            addr,
            name: name.to_string(),
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ByteEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Sends `bytes` to 127.0.0.1:`port`, ends the writing side (half-close)
/// and returns everything read until the other side closes.
pub fn half_close_exchange(port: u16, bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = connect(port)?;
    s.write_all(bytes)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// A TCPMapping; `extra` is block YAML at the level of its spec's keys.
pub fn tcp_mapping(name: &str, port: u16, service: &str, extra: &str) -> String {
    doc(
        "TCPMapping",
        &format!("name: {}", q(name)),
        &format!("port: {port}\nservice: {}\n{extra}", q(service)),
    )
}
