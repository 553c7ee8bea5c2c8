//! The system nginx as an upstream pingress-echo cannot play: a real
//! server's TLS, h2c and path handling.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::pki::CertFiles;
use super::ports::{free_port, port_open};
use super::process::kill_child;

pub const NGINX: &str = "/usr/sbin/nginx";

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
