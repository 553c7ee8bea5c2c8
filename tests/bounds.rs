//! What a client can make the gateway hold, through the real binary: how
//! long it waits for a request head and between requests, how large a head
//! may grow, and how many connections it keeps open.
//!
//! Each test is an attack that worked before these bounds: a head sent one
//! byte at a time (Pingora's timeout is per read), a kept-alive connection
//! that never sends again, 150 connections each sending a megabyte of
//! header lines that never end, and more connections than the pod can hold.

#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A gateway routing everything to an echo upstream, with `downstream`
/// (block YAML under the gateway file's `downstream:`) and a Module with
/// `module_config` when it is not empty.
fn start(downstream: &str, module_config: &str) -> (TempDir, Gateway, u16, Echo) {
    let echo = Echo::plain("up");
    let dir = tempdir();
    let port = free_port();
    let mut resources = mapping("up", "", "/", &echo, "hostname: \"*\"");
    if !module_config.is_empty() {
        resources.push_str(&module(module_config));
    }
    write_gateway_with_listener(dir.path(), port, free_port(), "", &resources);
    if !downstream.is_empty() {
        let path = dir.path().join("gateway.yaml");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str(&format!("downstream:\n{}", indent(downstream, 2)));
        fs::write(&path, text).unwrap();
    }
    let gateway = Gateway::start(dir.path());
    (dir, gateway, port, echo)
}

fn open(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

/// Everything the gateway sends until it closes the connection, and when
/// it closed, counted from `since`. Panics if it is still open after 15 s.
fn until_closed(stream: &mut TcpStream, since: Instant) -> (String, Duration) {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "still open after {:?} ({e}); read so far: {}",
                since.elapsed(),
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    (
        String::from_utf8_lossy(&bytes).into_owned(),
        since.elapsed(),
    )
}

/// Reads one response with a `Content-Length` off a kept-alive connection.
fn read_response(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&bytes);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if bytes.len() >= end + 4 + length {
                return text.into_owned();
            }
        }
    }
}

fn get_with(header_bytes: usize) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Fill: {}\r\nConnection: close\r\n\r\n",
        "f".repeat(header_bytes)
    )
    .into_bytes()
}

fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

// ---------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------

#[test]
fn a_head_must_arrive_whole_within_the_deadline() {
    let (_dir, gateway, port, _echo) = start("request_head_timeout_ms: 1000", "");

    // Half a head, then silence: 408 at the deadline.
    let started = Instant::now();
    let mut half = open(port);
    half.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap();
    let (reply, after) = until_closed(&mut half, started);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );

    // A byte every 200 ms never lets a per-read timeout fire; the
    // deadline counts the whole head.
    let started = Instant::now();
    let mut slow = open(port);
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .unwrap();
    let mut writer = slow.try_clone().unwrap();
    let trickle = thread::spawn(move || {
        for _ in 0..40 {
            thread::sleep(Duration::from_millis(200));
            if writer.write_all(b"s").is_err() {
                return;
            }
        }
    });
    let (reply, after) = until_closed(&mut slow, started);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(after < Duration::from_secs(4), "closed after {after:?}");
    trickle.join().unwrap();

    // A connection that never sends a byte is closed without a word:
    // browsers open spare connections and may never use them.
    let started = Instant::now();
    let mut silent = open(port);
    let (reply, after) = until_closed(&mut silent, started);
    assert_eq!(reply, "");
    assert!(after < Duration::from_secs(4), "closed after {after:?}");

    assert_eq!(
        gateway.metric("pingress_downstream_connections_closed_total{reason=\"head_timeout\"}"),
        Some(2.0)
    );
    // The gateway still serves.
    assert_eq!(request(port, "GET", "/", &[]).status, 200);
}

#[test]
fn a_kept_alive_connection_is_closed_after_listener_idle_timeout_ms() {
    let (_dir, _gateway, port, _echo) = start("", "listener_idle_timeout_ms: 1000");
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

    // Requests every 400 ms keep the connection: the idle time starts
    // again after each.
    let mut busy = open(port);
    for _ in 0..5 {
        busy.write_all(request).unwrap();
        assert!(read_response(&mut busy).starts_with("HTTP/1.1 200"));
        thread::sleep(Duration::from_millis(400));
    }
    busy.write_all(request).unwrap();
    assert!(read_response(&mut busy).starts_with("HTTP/1.1 200"));

    // Then silence: closed after the idle timeout, without a word.
    let started = Instant::now();
    let (rest, after) = until_closed(&mut busy, started);
    assert_eq!(rest, "");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(4),
        "closed after {after:?}"
    );
}

// ---------------------------------------------------------------------------
// Size
// ---------------------------------------------------------------------------

#[test]
fn a_head_larger_than_max_request_headers_kb_gets_431() {
    let (_dir, gateway, port, _echo) = start("", "max_request_headers_kb: 8");
    let fits = send_raw(port, &get_with(7 * 1024)).unwrap();
    assert_eq!(fits.status, 200, "{}", fits.text());
    fits.echo_ok();

    let response = send_raw(port, &get_with(9 * 1024)).unwrap();
    assert_eq!(response.status, 431, "{}", response.text());
    assert!(response.text().contains("max_request_headers_kb"));
    assert_eq!(
        gateway.metric("pingress_downstream_connections_closed_total{reason=\"head_too_large\"}"),
        Some(1.0)
    );
}

/// The figure: 150 connections that each send about a megabyte of
/// header lines and never end the head grew the gateway by ~200 MB, which
/// the allocator kept. Now each is cut at the head limit (60 KiB by
/// default) and answered 431, and other clients are served as usual.
#[test]
fn unfinished_heads_do_not_grow_memory_and_others_are_served() {
    let (_dir, gateway, port, _echo) = start("", "");
    for _ in 0..20 {
        assert_eq!(request(port, "GET", "/", &[]).status, 200);
    }
    let before = rss_kib(gateway.pid());

    let attackers: Vec<_> = (0..150)
        .map(|i| {
            thread::spawn(move || {
                let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
                    return;
                };
                let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                // Fewer lines than Pingora's 256 headers, so only size can
                // stop them.
                let line = format!("X-Fill-{i}: {}\r\n", "a".repeat(8000));
                let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n");
                let mut sent = 0;
                while sent < 1_000_000 {
                    if stream.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    sent += line.len();
                }
                // Hold the connection, as an attacker would.
                thread::sleep(Duration::from_secs(3));
            })
        })
        .collect();

    let mut peak = before;
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while attackers.iter().any(|a| !a.is_finished()) && Instant::now() < deadline {
        peak = peak.max(rss_kib(gateway.pid()));
        let started = Instant::now();
        let response = Request::get("/").timeout(Duration::from_secs(5)).send(port);
        assert_eq!(response.status, 200, "{}", response.text());
        latencies.push(started.elapsed());
        thread::sleep(Duration::from_millis(50));
    }
    for attacker in attackers {
        attacker.join().unwrap();
    }
    peak = peak.max(rss_kib(gateway.pid()));

    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("RSS {before} KiB before, {peak} KiB at the peak");
    assert!(grown_mib < 64, "the gateway grew by {grown_mib} MiB");
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert!(!latencies.is_empty());
    assert!(
        median < Duration::from_millis(100)
            && latencies[latencies.len() - 1] < Duration::from_secs(2),
        "latencies under attack: {latencies:?}"
    );
}

// ---------------------------------------------------------------------------
// Connection caps
// ---------------------------------------------------------------------------

/// Whether the gateway closed a fresh connection at once.
fn refused_at_once(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        _ => false,
    }
}

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    let (_dir, gateway, port, _echo) = start("max_connections: 3", "");
    let held: Vec<TcpStream> = (0..3).map(|_| open(port)).collect();
    assert!(poll_until(Duration::from_secs(5), || {
        gateway.metric("pingress_downstream_connections") == Some(3.0)
    }));
    let mut extra = open(port);
    assert!(refused_at_once(&mut extra), "a fourth connection was kept");
    assert_eq!(
        gateway.metric("pingress_downstream_connections_refused_total{cap=\"max_connections\"}"),
        Some(1.0)
    );

    // A place given back is a place for the next client.
    drop(held);
    assert!(poll_until(Duration::from_secs(5), || {
        gateway.metric("pingress_downstream_connections") == Some(0.0)
    }));
    assert_eq!(request(port, "GET", "/", &[]).status, 200);
}

#[test]
fn one_client_address_holds_at_most_max_connections_per_client() {
    let (_dir, gateway, port, _echo) = start("max_connections_per_client: 2", "");
    let _held: Vec<TcpStream> = (0..2).map(|_| open(port)).collect();
    assert!(poll_until(Duration::from_secs(5), || {
        gateway.metric("pingress_downstream_connections") == Some(2.0)
    }));
    let mut third = open(port);
    assert!(refused_at_once(&mut third), "a third connection was kept");
    assert_eq!(
        gateway.metric(
            "pingress_downstream_connections_refused_total{cap=\"max_connections_per_client\"}"
        ),
        Some(1.0)
    );
    // Another address is another client.
    let other = Request::get("/").source_ip("127.0.0.2").send(port);
    assert_eq!(other.status, 200, "{}", other.text());
}
