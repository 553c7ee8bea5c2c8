//! `pingress-echo`: a tiny HTTP/1.1 upstream that describes every request it
//! receives as JSON.
//!
//! It is the peer behind the quickstart demo and the integration tests (an
//! example, so its dependencies stay out of the library's): the
//! reply shows exactly what the gateway forwarded (method, raw request target,
//! headers in order, body length, TLS parameters and client certificate), and
//! a few `x-echo-*` request headers let a test make the upstream misbehave in
//! controlled ways (status, delay, extra response headers, closing).
//!
//! ```text
//! pingress-echo --listen 127.0.0.1:0 [--name NAME]
//!               [--tls-cert chain.pem --tls-key key.pem]
//!               [--client-ca ca.pem] [--require-client-cert]
//!               [--allow-prefix /extauth/public/]
//! ```
//!
//! The first line on stdout is `listening on <addr>` with the bound address,
//! so callers can ask for port 0 and learn the real port.
//!
//! Control headers: `x-echo-status: 503`, `x-echo-delay-ms: 2000`,
//! `x-echo-header: name: value` (repeatable), `x-echo-close: 1`.
//! `x-echo-key: K` counts the requests carrying K (the reply's `attempt`);
//! with `x-echo-fail-first: N` the first N of them get `x-echo-status`
//! (503 when absent) and later ones 200, so retries can be observed.
//!
//! A WebSocket handshake (`Upgrade: websocket` with a `Sec-WebSocket-Key`)
//! is accepted, and every data frame is then sent back as it came (pings
//! get pongs, a close is answered with a close).
//!
//! With `--allow-prefix P` the echo acts as an authorizer that allows one
//! subtree: a request whose target does not start with `P` gets 403
//! (its body still describes the request), whatever it asked for.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use openssl::ssl::{
    select_next_proto, AlpnError, NameType, Ssl, SslAcceptor, SslFiletype, SslMethod, SslRef,
    SslVerifyMode,
};
use openssl::x509::{X509Name, X509NameRef};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_openssl::SslStream;

/// Request heads larger than this are rejected; a test peer has no business
/// buffering unbounded input.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Chunk-size lines and trailers are short; anything longer is garbage.
const MAX_LINE: usize = 8 * 1024;
/// WebSocket frames are small in tests; a larger one ends the connection.
const MAX_FRAME: u64 = 1024 * 1024;
/// RFC 6455 §1.3: appended to the client's key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// A client that connects but never finishes the TLS handshake must not pin a
/// task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle keep-alive connections are dropped eventually so a leaked client
/// cannot keep the process busy forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
#[command(
    name = "pingress-echo",
    version,
    about = "HTTP/1.1 echo upstream for pingress demos and tests"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port (see the `listening on` line).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Name reported as "server" in every reply, to tell upstreams apart.
    #[arg(long, default_value = "echo")]
    name: String,
    /// PEM certificate chain (leaf first); enables TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle used to verify client certificates.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Fail the handshake when the client presents no certificate.
    #[arg(long, requires = "client_ca")]
    require_client_cert: bool,
    /// Answer 403 to every request whose target does not start with this
    /// prefix, as an authorizer that allows only one subtree.
    #[arg(long)]
    allow_prefix: Option<String>,
}

/// What the TLS layer negotiated, captured once per connection.
#[derive(Clone)]
struct TlsInfo(Value);

struct Shared {
    name: String,
    connections: AtomicU64,
    /// Requests seen per `x-echo-key`.
    attempts: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// `--allow-prefix`: targets outside it are answered 403.
    allow_prefix: Option<String>,
}

/// Keys kept before the counts start over: a test peer must not grow
/// without bound when a client invents keys forever.
const MAX_KEYS: usize = 100_000;

impl Shared {
    /// This request's number among those with its key, from 1.
    fn attempt(&self, key: &str) -> u64 {
        let Ok(mut attempts) = self.attempts.lock() else {
            return 1;
        };
        if attempts.len() >= MAX_KEYS && !attempts.contains_key(key) {
            attempts.clear();
        }
        let count = attempts.entry(key.to_string()).or_insert(0);
        *count += 1;
        *count
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pingress-echo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let acceptor = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(build_acceptor(
            cert,
            key,
            args.client_ca.as_ref(),
            args.require_client_cert,
        )?)),
        _ => None,
    };

    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("bind {}: {e}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    {
        // Tests block on this line, so it must leave the process immediately
        // even when stdout is a pipe (block-buffered).
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {local}").map_err(|e| format!("stdout: {e}"))?;
        out.flush().map_err(|e| format!("stdout: {e}"))?;
    }

    let shared = Arc::new(Shared {
        name: args.name,
        connections: AtomicU64::new(0),
        attempts: Default::default(),
        allow_prefix: args.allow_prefix,
    });

    loop {
        let (tcp, _peer) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                // EMFILE and friends are transient; back off instead of
                // spinning or exiting under load.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // Counted at accept time so every TCP connection gets its own number,
        // including ones whose TLS handshake later fails.
        let conn_id = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let shared = Arc::clone(&shared);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => serve(tcp, None, conn_id, &shared).await,
                Some(acceptor) => {
                    if let Some((stream, info)) = tls_accept(&acceptor, tcp).await {
                        serve(stream, Some(info), conn_id, &shared).await;
                    }
                }
            }
        });
    }
}

fn build_acceptor(
    cert: &PathBuf,
    key: &PathBuf,
    client_ca: Option<&PathBuf>,
    require: bool,
) -> Result<SslAcceptor, String> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|e| format!("tls init: {e}"))?;
    b.set_certificate_chain_file(cert)
        .map_err(|e| format!("load {}: {e}", cert.display()))?;
    b.set_private_key_file(key, SslFiletype::PEM)
        .map_err(|e| format!("load {}: {e}", key.display()))?;
    b.check_private_key()
        .map_err(|e| format!("{} does not match {}: {e}", key.display(), cert.display()))?;
    // This server only speaks HTTP/1.1; refusing h2 keeps clients that offer
    // it from negotiating a protocol we would then misparse.
    b.set_alpn_select_callback(|_, client| {
        select_next_proto(b"\x08http/1.1", client).ok_or(AlpnError::NOACK)
    });
    if let Some(ca) = client_ca {
        b.set_ca_file(ca)
            .map_err(|e| format!("load {}: {e}", ca.display()))?;
        // Advertise the acceptable CAs so clients holding several certs pick
        // the right one.
        let names =
            X509Name::load_client_ca_file(ca).map_err(|e| format!("load {}: {e}", ca.display()))?;
        b.set_client_ca_list(names);
        let mut mode = SslVerifyMode::PEER;
        if require {
            mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
        }
        b.set_verify(mode);
    }
    Ok(b.build())
}

async fn tls_accept(
    acceptor: &SslAcceptor,
    tcp: TcpStream,
) -> Option<(SslStream<TcpStream>, TlsInfo)> {
    let ssl = Ssl::new(acceptor.context()).ok()?;
    let mut stream = SslStream::new(ssl, tcp).ok()?;
    // A failed handshake is an expected outcome in mTLS tests, not an error
    // worth reporting: the client sees the alert.
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, Pin::new(&mut stream).accept()).await {
        Ok(Ok(())) => {}
        _ => return None,
    }
    let info = tls_info(stream.ssl());
    Some((stream, info))
}

fn tls_info(ssl: &SslRef) -> TlsInfo {
    let client_cert = ssl.peer_certificate().map(|c| {
        let serial = c
            .serial_number()
            .to_bn()
            .and_then(|bn| bn.to_hex_str().map(|s| s.to_string()))
            .unwrap_or_default();
        json!({
            "subject": one_line(c.subject_name()),
            "issuer": one_line(c.issuer_name()),
            "serial": serial.to_uppercase(),
        })
    });
    TlsInfo(json!({
        "sni": ssl.servername(NameType::HOST_NAME),
        "version": ssl.version_str(),
        "alpn": ssl.selected_alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
        "client_cert": client_cert,
    }))
}

/// `CN=..,O=..` in certificate order, which is how tests write expectations.
fn one_line(name: &X509NameRef) -> String {
    name.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let val = e
                .data()
                .to_string()
                .unwrap_or_else(|_| String::from_utf8_lossy(e.data().as_slice()).into_owned());
            format!("{key}={val}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a connection stops being served.
enum Stop {
    /// Peer went away or the socket failed: nothing useful can be sent.
    Gone,
    /// The request was unacceptable: answer 400 and close.
    Bad(String),
}

impl From<std::io::Error> for Stop {
    fn from(_: std::io::Error) -> Self {
        Stop::Gone
    }
}

/// A byte stream with a read-ahead buffer, so pipelined requests and the
/// tail of a body that arrived with the head are not lost.
struct Conn<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn fill(&mut self) -> Result<usize, Stop> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.io.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    async fn read_line(&mut self) -> Result<Vec<u8>, Stop> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(Stop::Bad("line too long".into()));
            }
            if self.fill().await? == 0 {
                return Err(Stop::Gone);
            }
        }
    }

    /// Exactly `n` bytes, read ahead or from the stream.
    async fn take(&mut self, n: usize) -> Result<Vec<u8>, Stop> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(Stop::Gone);
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Discards exactly `n` body bytes; only the length is reported, so the
    /// body is never held in memory.
    async fn skip(&mut self, mut n: u64) -> Result<(), Stop> {
        loop {
            let take = (self.buf.len() as u64).min(n) as usize;
            self.buf.drain(..take);
            n -= take as u64;
            if n == 0 {
                return Ok(());
            }
            if self.fill().await? == 0 {
                return Err(Stop::Gone);
            }
        }
    }
}

struct Head {
    method: String,
    target: String,
    minor: u8,
    headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn value_str(&self, name: &str) -> Option<String> {
        self.values(name)
            .next()
            .map(|v| String::from_utf8_lossy(v).trim().to_string())
    }

    /// Comma-separated tokens across all instances of a header, lowercased.
    fn tokens(&self, name: &str) -> Vec<String> {
        self.values(name)
            .flat_map(|v| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

enum Framing {
    None,
    Length(u64),
    Chunked,
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    tls: Option<TlsInfo>,
    conn_id: u64,
    shared: &Shared,
) {
    let mut conn = Conn {
        io,
        buf: Vec::new(),
    };
    loop {
        match handle_one(&mut conn, tls.as_ref(), conn_id, shared).await {
            Ok(true) => continue,
            Ok(false) => break,
            Err(Stop::Gone) => return,
            Err(Stop::Bad(why)) => {
                let body = ordered_json(&[("server", json!(shared.name)), ("error", json!(why))]);
                let resp = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                if conn.io.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                let _ = conn.io.flush().await;
                break;
            }
        }
    }
    close_gracefully(&mut conn.io).await;
}

/// Sends FIN (and close_notify for TLS), then drains briefly: closing with
/// unread input makes the kernel send RST, which can destroy the response we
/// just wrote before the client reads it.
async fn close_gracefully<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = io.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        loop {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Serves one request; `Ok(true)` means the connection stays open.
async fn handle_one<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    tls: Option<&TlsInfo>,
    conn_id: u64,
    shared: &Shared,
) -> Result<bool, Stop> {
    let Some(head) = read_head(conn).await? else {
        return Ok(false);
    };

    let framing = body_framing(&head)?;
    let wants_continue = head.minor >= 1
        && head.tokens("expect").iter().any(|t| t == "100-continue")
        && !matches!(framing, Framing::None | Framing::Length(0));
    if wants_continue {
        // Clients such as curl otherwise stall a second before sending the body.
        conn.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        conn.io.flush().await?;
    }
    let body_len = read_body(conn, framing).await?;
    if let Some(key) = websocket_key(&head) {
        websocket_echo(conn, &key).await?;
        return Ok(false);
    }

    let attempt = head.value_str("x-echo-key").map(|key| shared.attempt(&key));
    let fail_first = match head.value_str("x-echo-fail-first") {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if attempt.is_some() => Some(n),
            _ => {
                return Err(Stop::Bad(format!(
                    "bad x-echo-fail-first (needs x-echo-key): {s:?}"
                )))
            }
        },
    };
    let status = match head.value_str("x-echo-status") {
        None => None,
        Some(s) => match s.parse::<u16>() {
            Ok(code) if (200..=999).contains(&code) => Some(code),
            _ => return Err(Stop::Bad(format!("bad x-echo-status: {s:?}"))),
        },
    };
    let status = match (fail_first, attempt) {
        (Some(n), Some(attempt)) if attempt > n => 200,
        (Some(_), _) => status.unwrap_or(503),
        (None, _) => status.unwrap_or(200),
    };
    let status = match &shared.allow_prefix {
        Some(prefix) if !head.target.starts_with(prefix.as_str()) => 403,
        _ => status,
    };
    let delay = match head.value_str("x-echo-delay-ms") {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(_) => return Err(Stop::Bad(format!("bad x-echo-delay-ms: {s:?}"))),
        },
    };
    let mut extra: Vec<(String, String)> = Vec::new();
    for v in head.values("x-echo-header") {
        let v = String::from_utf8_lossy(v);
        match v.split_once(':') {
            Some((n, val)) if is_token(n.trim()) => {
                extra.push((n.trim().to_string(), val.trim().to_string()));
            }
            _ => return Err(Stop::Bad(format!("bad x-echo-header: {v:?}"))),
        }
    }
    let echo_close = head
        .value_str("x-echo-close")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));

    let conn_tokens = head.tokens("connection");
    let keep_alive = !echo_close
        && !conn_tokens.iter().any(|t| t == "close")
        && (head.minor >= 1 || conn_tokens.iter().any(|t| t == "keep-alive"));

    let headers: Vec<Value> = head
        .headers
        .iter()
        .map(|(n, v)| json!([n, String::from_utf8_lossy(v)]))
        .collect();
    let body = ordered_json(&[
        ("server", json!(shared.name)),
        ("method", json!(head.method)),
        ("uri", json!(head.target)),
        ("version", json!(format!("HTTP/1.{}", head.minor))),
        ("headers", Value::Array(headers)),
        ("body_len", json!(body_len)),
        ("tls", tls.map_or(Value::Null, |t| t.0.clone())),
        ("connection", json!(conn_id)),
        ("attempt", json!(attempt)),
    ]);

    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }

    let bodyless_status = status == 204 || status == 304;
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if !extra
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        && !bodyless_status
    {
        out.push_str("content-type: application/json\r\n");
    }
    if !bodyless_status {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    for (n, v) in &extra {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if !keep_alive {
        out.push_str("connection: close\r\n");
    } else if head.minor == 0 {
        out.push_str("connection: keep-alive\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !bodyless_status && !head.method.eq_ignore_ascii_case("HEAD") {
        bytes.extend_from_slice(body.as_bytes());
    }
    conn.io.write_all(&bytes).await?;
    conn.io.flush().await?;
    Ok(keep_alive)
}

/// The `Sec-WebSocket-Key` of a WebSocket handshake.
fn websocket_key(head: &Head) -> Option<String> {
    let upgrade = head.tokens("upgrade").iter().any(|t| t == "websocket");
    (upgrade && head.method == "GET")
        .then(|| head.value_str("sec-websocket-key"))
        .flatten()
}

/// Accepts the handshake, then echoes frames until a close or an error.
async fn websocket_echo<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    key: &str,
) -> Result<(), Stop> {
    use base64::Engine as _;
    let digest = openssl::sha::sha1(format!("{key}{WEBSOCKET_GUID}").as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(digest);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-accept: {accept}\r\n\r\n"
    );
    conn.io.write_all(response.as_bytes()).await?;
    conn.io.flush().await?;
    loop {
        let head = conn.take(2).await?;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => {
                let bytes = conn.take(2).await?;
                u64::from(u16::from_be_bytes([bytes[0], bytes[1]]))
            }
            127 => {
                let bytes = conn.take(8).await?;
                u64::from_be_bytes(bytes.try_into().map_err(|_| Stop::Gone)?)
            }
            short => u64::from(short),
        };
        if len > MAX_FRAME {
            return Err(Stop::Gone);
        }
        let mask = if masked {
            conn.take(4).await?
        } else {
            vec![0; 4]
        };
        // Bounded by MAX_FRAME above, so it fits in usize.
        let mut payload = conn.take(len as usize).await?;
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
        let reply_opcode = match opcode {
            0x9 => 0xa,
            0xa => continue,
            other => other,
        };
        // Server frames are never masked (RFC 6455 §5.1).
        let mut frame = vec![(head[0] & 0x80) | reply_opcode];
        match payload.len() {
            n if n < 126 => frame.push(n as u8),
            n if n <= usize::from(u16::MAX) => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&payload);
        conn.io.write_all(&frame).await?;
        conn.io.flush().await?;
        if opcode == 0x8 {
            return Ok(());
        }
    }
}

/// Returns `None` on a clean EOF between requests.
async fn read_head<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
) -> Result<Option<Head>, Stop> {
    loop {
        if !conn.buf.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut slots);
            match req.parse(&conn.buf) {
                Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                    return Err(Stop::Bad("request head too large".into()));
                }
                Ok(httparse::Status::Complete(len)) => {
                    let head = Head {
                        method: req.method.unwrap_or_default().to_string(),
                        target: req.path.unwrap_or_default().to_string(),
                        minor: req.version.unwrap_or(1),
                        headers: req
                            .headers
                            .iter()
                            .map(|h| (h.name.to_string(), h.value.to_vec()))
                            .collect(),
                    };
                    conn.buf.drain(..len);
                    return Ok(Some(head));
                }
                Ok(httparse::Status::Partial) => {
                    if conn.buf.len() > MAX_HEAD {
                        return Err(Stop::Bad("request head too large".into()));
                    }
                }
                Err(e) => return Err(Stop::Bad(format!("malformed request: {e}"))),
            }
        }
        let n = match tokio::time::timeout(IDLE_TIMEOUT, conn.fill()).await {
            Ok(r) => r?,
            Err(_) => return Ok(None),
        };
        if n == 0 {
            if conn.buf.is_empty() {
                return Ok(None);
            }
            return Err(Stop::Gone);
        }
    }
}

fn body_framing(head: &Head) -> Result<Framing, Stop> {
    let te = head.tokens("transfer-encoding");
    let has_cl = head.values("content-length").next().is_some();
    if !te.is_empty() {
        // Both framings at once is the classic smuggling vector; a test peer
        // should make it visible rather than guess.
        if has_cl {
            return Err(Stop::Bad(
                "both transfer-encoding and content-length".into(),
            ));
        }
        if te.last().map(String::as_str) != Some("chunked") {
            return Err(Stop::Bad("unsupported transfer-encoding".into()));
        }
        return Ok(Framing::Chunked);
    }
    let mut len: Option<u64> = None;
    for v in head.values("content-length") {
        for part in String::from_utf8_lossy(v).split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Stop::Bad("bad content-length".into()));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| Stop::Bad("bad content-length".into()))?;
            if len.is_some_and(|l| l != n) {
                return Err(Stop::Bad("conflicting content-length".into()));
            }
            len = Some(n);
        }
    }
    Ok(match len {
        Some(n) => Framing::Length(n),
        None => Framing::None,
    })
}

async fn read_body<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    framing: Framing,
) -> Result<u64, Stop> {
    match framing {
        Framing::None => Ok(0),
        Framing::Length(n) => {
            conn.skip(n).await?;
            Ok(n)
        }
        Framing::Chunked => {
            let mut total: u64 = 0;
            loop {
                let line = conn.read_line().await?;
                let line = String::from_utf8_lossy(&line);
                let size_str = line.split(';').next().unwrap_or_default().trim();
                if size_str.is_empty() || !size_str.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Stop::Bad(format!("bad chunk size: {line:?}")));
                }
                let size = u64::from_str_radix(size_str, 16)
                    .map_err(|_| Stop::Bad(format!("bad chunk size: {line:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !conn.read_line().await?.is_empty() {}
                    return Ok(total);
                }
                conn.skip(size).await?;
                total = total.saturating_add(size);
                if !conn.read_line().await?.is_empty() {
                    return Err(Stop::Bad("missing CRLF after chunk".into()));
                }
            }
        }
    }
}

/// One JSON object per line with keys in the given order: serde_json's map
/// sorts keys, which makes replies needlessly hard to read in the quickstart.
fn ordered_json(fields: &[(&str, Value)]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", Value::from(*k)))
        .collect();
    format!("{{{}}}\n", parts.join(","))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}
