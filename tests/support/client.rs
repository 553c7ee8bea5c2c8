//! The client side: HTTP/1.1 over raw sockets, so tests control every byte
//! (odd request targets, missing Host headers, keep-alive), in cleartext or
//! over TLS.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslStream, SslVersion};
use openssl::x509::X509;
use serde_json::Value;

use super::echo::EchoReply;
use super::pki::CertFiles;

/// Default read timeout for the HTTP client: long enough for slow CI, short
/// enough that a hung gateway fails the test instead of hanging it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

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
        self.try_send_tls_peer(port, tls)
            .map(|(response, _)| response)
    }

    pub fn send_tls(self, port: u16, tls: &TlsOpts) -> Response {
        self.try_send_tls(port, tls)
            .unwrap_or_else(|e| panic!("{e}"))
    }

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

pub(super) fn connect(port: u16) -> io::Result<TcpStream> {
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

    /// The body as a pingress-echo reply, if it is one: only a request the
    /// echo served gets a `connection` (its error replies have none).
    fn echo_json(&self) -> Option<Value> {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .filter(|json| json.get("connection").is_some())
    }

    /// Whether an echo upstream answered, rather than the gateway itself.
    pub fn is_echo(&self) -> bool {
        self.echo_json().is_some()
    }

    /// The body parsed as a pingress-echo reply; panics (showing the
    /// response) if it is not one.
    pub fn echo(&self) -> EchoReply {
        match self.echo_json() {
            Some(json) => EchoReply { json },
            None => panic!(
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

    /// Whether the gateway closes the connection within the read timeout
    /// without being sent anything (a timeout is not a close).
    pub fn closes_by_itself(&mut self) -> bool {
        if !self.wire.buf.is_empty() {
            return false;
        }
        match self.wire.fill() {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }
}

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
    /// The newest TLS version to offer; `None`: OpenSSL's newest.
    pub max_version: Option<SslVersion>,
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
            max_version: None,
        }
    }

    pub fn max_version(mut self, version: SslVersion) -> TlsOpts {
        self.max_version = Some(version);
        self
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
    b.set_max_proto_version(opts.max_version)
        .map_err(|e| e.to_string())?;
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
