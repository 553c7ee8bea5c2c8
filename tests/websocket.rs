//! `allow_upgrade` and `use_websocket`: a WebSocket through the gateway to
//! pingress-echo, frames both ways; upgrades a Mapping does not name are
//! refused with Envoy's 403; HTTP/1.0, `h2c` and HTTP/2 upgrade requests are
//! proxied as plain requests.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// RFC 6455 §1.3: the accept value of the sample key above.
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A client WebSocket after its handshake.
struct Socket {
    stream: TcpStream,
}

impl Socket {
    /// Sends the handshake; `Err` carries the response head when the
    /// answer is not a 101.
    fn open(port: u16, path: &str, protocol: &str) -> Result<(Socket, String), String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: ws.example\r\nUpgrade: {protocol}\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                other => return Err(format!("reading the handshake: {other:?}")),
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head);
        }
        Ok((Socket { stream }, head))
    }

    /// Sends one masked text frame, as a client must.
    fn send(&mut self, text: &str) {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        assert!(text.len() < 126, "short frames only");
        let mut frame = vec![0x81, 0x80 | text.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).expect("send a frame");
    }

    /// Reads one unmasked frame: (opcode, payload).
    fn receive(&mut self) -> (u8, String) {
        let mut head = [0u8; 2];
        self.stream.read_exact(&mut head).expect("frame head");
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
        self.stream.read_exact(&mut payload).expect("frame payload");
        (
            head[0] & 0x0f,
            String::from_utf8_lossy(&payload).into_owned(),
        )
    }
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn allowed_upgrades_echo_frames_both_ways() {
    let echo = Echo::plain("ws");
    let resources = [
        // Protocol names compare in any case.
        mapping(
            "ws",
            "",
            "/ws/",
            &echo,
            "hostname: \"*\"\nallow_upgrade: [WebSocket]\ntimeout_ms: 300",
        ),
        mapping(
            "legacy",
            "",
            "/legacy/",
            &echo,
            "hostname: \"*\"\nuse_websocket: true",
        ),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let (mut socket, head) = Socket::open(port, "/ws/chat", "websocket")
        .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log()));
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some(ACCEPT),
        "{head}"
    );
    for word in ["one", "two", "three"] {
        socket.send(word);
        assert_eq!(socket.receive(), (0x1, word.to_string()));
    }
    // The route timeout (300 ms) bounds the handshake, not the open
    // socket's silences.
    std::thread::sleep(Duration::from_millis(800));
    socket.send("four");
    assert_eq!(socket.receive(), (0x1, "four".to_string()));

    let (mut legacy, _) = Socket::open(port, "/legacy/", "WebSocket")
        .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log()));
    legacy.send("hello");
    assert_eq!(legacy.receive(), (0x1, "hello".to_string()));

    // A plain request to the same Mapping is proxied as any other.
    let plain = Request::get("/ws/plain").send(port).echo_ok();
    assert!(!plain.has_header("upgrade"));
}

#[test]
fn upgrades_the_mapping_does_not_name_are_refused() {
    let echo = Echo::plain("plain");
    let resources = [
        mapping("plain", "", "/plain/", &echo, "hostname: \"*\""),
        mapping(
            "ws",
            "",
            "/ws/",
            &echo,
            "hostname: \"*\"\nallow_upgrade: [websocket]",
        ),
        mapping(
            "spdy",
            "",
            "/spdy/",
            &echo,
            "hostname: \"*\"\nallow_upgrade: [spdy/3.1]",
        ),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let refused = Socket::open(port, "/plain/", "websocket")
        .err()
        .unwrap_or_default();
    assert!(
        refused.starts_with("HTTP/1.1 403"),
        "{refused}\n{}",
        gateway.log()
    );
    let refused = Socket::open(port, "/ws/", "spdy/3.1")
        .err()
        .unwrap_or_default();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");

    // Another allowed protocol reaches the upstream with its handshake
    // headers intact (pingress-echo answers it as a plain request).
    let reply = Request::get("/spdy/")
        .headers(&[("upgrade", "spdy/3.1"), ("connection", "Upgrade")])
        .send(port)
        .echo_ok();
    assert_eq!(reply.header("upgrade").as_deref(), Some("spdy/3.1"));
    // The other hop-by-hop headers stay on the client's hop, and so do the
    // ones its Connection names.
    let reply = Request::get("/spdy/")
        .headers(&[
            ("upgrade", "spdy/3.1"),
            ("connection", "Upgrade, x-hop, keep-alive"),
            ("x-hop", "mine"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic c2VjcmV0"),
        ])
        .send(port)
        .echo_ok();
    assert_eq!(reply.header("upgrade").as_deref(), Some("spdy/3.1"));
    assert_eq!(reply.header("connection").as_deref(), Some("upgrade"));
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "proxy-authorization",
    ] {
        assert!(
            !reply.has_header(hop),
            "{hop} was forwarded: {:?}",
            reply.headers()
        );
    }

    // HTTP/1.0 cannot upgrade (RFC 9110 §7.8): proxied as a plain request,
    // without the hop-by-hop Upgrade header.
    let reply = send_raw(
        port,
        b"GET /plain/ HTTP/1.0\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .expect("HTTP/1.0 exchange");
    assert!(!reply.echo_ok().has_header("upgrade"));

    // h2c is not an upgrade Envoy proxies either: the request goes on
    // without it.
    let reply = Request::get("/plain/")
        .headers(&[
            ("upgrade", "h2c"),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ])
        .send(port)
        .echo_ok();
    assert!(!reply.has_header("upgrade"));
    assert!(!reply.has_header("http2-settings"));
}

#[test]
fn protocol_names_are_checked() {
    let dir = tempdir();
    let resources = [
        doc(
            "Mapping",
            "name: empty",
            "hostname: \"*\"\nprefix: /e/\nservice: 127.0.0.1:9\nallow_upgrade: [\"\"]",
        ),
        doc(
            "Mapping",
            "name: spaced",
            "hostname: \"*\"\nprefix: /s/\nservice: 127.0.0.1:9\nallow_upgrade: [\"web socket\"]",
        ),
    ]
    .concat();
    write_gateway(dir.path(), free_port(), free_port(), &resources);
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    for expected in [
        "Mapping default/empty: spec.allow_upgrade[0]: \"\" is not a protocol name",
        "Mapping default/spaced: spec.allow_upgrade[0]: \"web socket\" is not a protocol name",
    ] {
        assert!(out.stdout.contains(expected), "{expected}\n{}", out.stdout);
    }
}

/// HTTP/2 has no `Upgrade` (RFC 9113 §8.2.2) and Pingora no extended
/// CONNECT: an h2 client asking for one sends a plain request, proxied as
/// such, even to a Mapping that allows WebSockets.
#[test]
fn http2_requests_do_not_upgrade() {
    let echo = Echo::plain("h2");
    let resources = mapping(
        "ws",
        "",
        "/ws/",
        &echo,
        "hostname: \"*\"\nallow_upgrade: [websocket]",
    );
    let (_dir, gateway, port) = start_gateway("", &resources);
    let output = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .args(["-H", "Upgrade: websocket", "-H", "Connection: Upgrade"])
        .args(["-H", &format!("Sec-WebSocket-Key: {KEY}")])
        .arg(format!("http://127.0.0.1:{port}/ws/"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, outcome) = text.rsplit_once('\n').unwrap_or_default();
    assert_eq!(outcome, "2 200", "{text}\n{}", gateway.log());
    let seen: serde_json::Value = serde_json::from_str(body).expect("an echo reply");
    let headers = seen["headers"].to_string().to_ascii_lowercase();
    assert!(!headers.contains("\"upgrade\""), "{headers}");
    assert!(headers.contains("sec-websocket-key"), "{headers}");
}
