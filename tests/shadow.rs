//! Shadow Mappings
//! (<https://www.getambassador.io/docs/emissary/latest/topics/using/shadowing>):
//! a share of a group's requests is copied to the shadow's service with the
//! primary's rewrites and a `-shadow` Host, the primary's answers are the
//! primary's, and a slow or dead shadow does not slow the primary down.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// A request as the shadow upstream got it: head and body.
type Seen = (String, Vec<u8>);

/// A shadow upstream that records every request it gets (head and body)
/// and answers 200 after `delay`.
struct Recorder {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start(delay: Duration) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let record = record.clone();
                std::thread::spawn(move || serve(stream, &record, delay));
            }
        });
        Recorder { port, seen }
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// Waits until `expected` requests are in, or the count stops growing.
    fn settle(&self, expected: usize) -> usize {
        let mut last = usize::MAX;
        // Either way the count below is the answer.
        let _ = poll_until(Duration::from_secs(10), || {
            let now = self.count();
            let stable = now == last;
            last = now;
            now >= expected || stable
        });
        self.count()
    }
}

/// Keep-alive HTTP/1.1 with Content-Length bodies, as the gateway sends.
fn serve(stream: TcpStream, record: &Mutex<Vec<Seen>>, delay: Duration) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let end = line == "\r\n";
            head.push_str(&line);
            if end {
                break;
            }
        }
        let length = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        record.lock().expect("lock").push((head, body));
        std::thread::sleep(delay);
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nshadow";
        if writer.write_all(answer).is_err() {
            return;
        }
    }
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn shadow(name: &str, prefix: &str, port: u16, extra: &str) -> String {
    doc(
        "Mapping",
        &format!("name: {name}"),
        &format!(
            "hostname: \"*\"\nprefix: {prefix}\nservice: 127.0.0.1:{port}\nshadow: true\n{extra}"
        ),
    )
}

#[test]
fn a_share_of_requests_is_copied_with_the_primary_rewrites() {
    let primary = Echo::plain("primary");
    let half = Recorder::start(Duration::ZERO);
    let full = Recorder::start(Duration::ZERO);
    let resources = [
        mapping(
            "half",
            "",
            "/half/",
            &primary,
            "hostname: \"*\"\nrewrite: /rewritten/",
        ),
        shadow(
            "half-shadow",
            "/half/",
            half.port,
            "weight: 50\nrewrite: /ignored/",
        ),
        mapping("full", "", "/full/", &primary, "hostname: \"*\""),
        shadow("full-shadow", "/full/", full.port, ""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let mut client = Client::connect(port);
    for i in 0..400 {
        let reply =
            client.send(Request::get(&format!("/half/{i}")).header("host", "shop.example:80"));
        let reply = reply.echo_ok();
        assert_eq!(reply.server(), "primary", "{}", gateway.log());
        assert_eq!(reply.uri(), format!("/rewritten/{i}"));
    }
    // Binomial(400, 0.5): 200 ± 50 is five standard deviations.
    let copies = half.settle(400);
    assert!(
        (150..=250).contains(&copies),
        "{copies} of 400 copied at 50%"
    );
    let (head, _) = &half.requests()[0];
    assert!(head.starts_with("GET /rewritten/"), "{head}");
    assert_eq!(
        header(head, "host"),
        Some("shop.example-shadow:80"),
        "{head}"
    );

    // Without a weight every request is copied, bodies included.
    for i in 0..20 {
        let body = format!("payload-{i}");
        let reply = client.send(Request::post("/full/", body.clone())).echo_ok();
        assert_eq!(reply.body_len(), body.len() as u64);
    }
    assert_eq!(full.settle(20), 20);
    let mut bodies: Vec<String> = full
        .requests()
        .iter()
        .map(|(_, body)| String::from_utf8_lossy(body).into_owned())
        .collect();
    bodies.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("payload-{i}")).collect();
    expected.sort();
    assert_eq!(bodies, expected);

    // A body too large to keep reaches the primary whole and is not copied.
    let large = vec![b'x'; 100 * 1024];
    let reply = client.send(Request::post("/full/", large)).echo_ok();
    assert_eq!(reply.body_len(), 100 * 1024);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(full.count(), 20);

    for (outcome, count) in [("sent", 20.0), ("not_copied", 1.0)] {
        let series = format!(
            "pingress_shadow_requests_total{{mapping=\"full-shadow.default\",outcome=\"{outcome}\"}}"
        );
        assert_eq!(gateway.metric(&series), Some(count), "{series}");
    }
}

/// The 99th percentile of 100 sequential requests' latencies.
fn p99(port: u16, path: &str) -> Duration {
    let mut client = Client::connect(port);
    let mut took: Vec<Duration> = (0..100)
        .map(|_| {
            let started = Instant::now();
            assert_eq!(client.get(path).echo_ok().server(), "primary");
            started.elapsed()
        })
        .collect();
    took.sort();
    took[98]
}

#[test]
fn a_slow_or_dead_shadow_does_not_slow_the_primary() {
    let primary = Echo::plain("primary");
    let slow = Recorder::start(Duration::from_secs(5));
    let dead = free_port();
    let resources = [
        mapping("slow", "", "/slow/", &primary, "hostname: \"*\""),
        shadow("slow-shadow", "/slow/", slow.port, "timeout_ms: 10000"),
        mapping("dead", "", "/dead/", &primary, "hostname: \"*\""),
        shadow("dead-shadow", "/dead/", dead, ""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let slow_p99 = p99(port, "/slow/");
    assert!(
        slow_p99 < Duration::from_secs(1),
        "{slow_p99:?}\n{}",
        gateway.log()
    );
    assert_eq!(slow.settle(100), 100);
    let dead_p99 = p99(port, "/dead/");
    assert!(dead_p99 < Duration::from_secs(1), "{dead_p99:?}");
}

#[test]
fn shadow_settings_are_checked() {
    let primary = Echo::plain("primary");
    let recorder = Recorder::start(Duration::ZERO);
    let resources = [
        mapping("main", "", "/twice/", &primary, "hostname: \"*\""),
        shadow("first", "/twice/", recorder.port, ""),
        shadow("second", "/twice/", recorder.port, ""),
        shadow("alone", "/alone/", recorder.port, ""),
        mapping("routed", "", "/redirected/", &primary, "hostname: \"*\""),
        shadow(
            "redirecting",
            "/redirected/",
            recorder.port,
            "host_redirect: true\npath_redirect: /elsewhere",
        ),
    ]
    .concat();
    let dir = tempdir();
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), &resources);
    let out = check(dir.path());
    for expected in [
        "error: resources/test.yaml document 4: Mapping default/second: spec.shadow: second.default shares its match with another shadow Mapping; a group has at most one",
        "warning: resources/test.yaml document 5: Mapping default/alone: spec.shadow: shadow Mapping alone.default has no Mapping with its match to mirror; it routes nothing",
        "warning: resources/test.yaml document 7: Mapping default/redirecting: spec.host_redirect: shadow and host_redirect exclude each other; the shadow wins and the redirect settings are ignored",
    ] {
        assert!(out.stdout.contains(expected), "{expected}\n{}", out.stdout);
    }

    let gateway = Gateway::start(dir.path());
    // A group with only a shadow routes nothing.
    assert_eq!(Request::get("/alone/").send(port).status, 404);
    // The shadow that was also a redirect mirrors.
    let reply = Request::get("/redirected/x").send(port).echo_ok();
    assert_eq!(reply.server(), "primary", "{}", gateway.log());
    assert_eq!(
        Request::get("/twice/").send(port).echo_ok().server(),
        "primary"
    );
    assert_eq!(recorder.settle(2), 2);
}
