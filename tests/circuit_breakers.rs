//! Circuit breakers
//! (<https://www.getambassador.io/docs/emissary/latest/topics/using/circuit-breakers>):
//! over the limit the gateway answers 503 with `x-envoy-overloaded: true`
//! at once, and no request fails at the transport level.

mod support;

use std::thread;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn over_the_limit_requests_get_503_overloaded() {
    let dir = tempdir();
    let echo = Echo::plain("slow");
    let port = free_port();
    let resources = format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: guarded\n\
         spec:\n  hostname: \"*\"\n  prefix: /guarded/\n  service: 127.0.0.1:{}\n  \
         circuit_breakers:\n  - max_connections: 1\n    max_pending_requests: 1\n",
        echo.port()
    );
    write_gateway(dir.path(), port, free_port(), &resources);
    let gateway = Gateway::start(dir.path());

    let started = Instant::now();
    let workers: Vec<_> = (0..40)
        .map(|_| {
            thread::spawn(move || {
                Request::get("/guarded/")
                    .header("x-echo-delay-ms", "400")
                    .try_send(port)
                    .map(|r| (r.status, r.header("x-envoy-overloaded").map(str::to_string)))
            })
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let transport_errors = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(transport_errors, 0, "{results:?}");
    let replies: Vec<(u16, Option<String>)> = results.into_iter().map(Result::unwrap).collect();
    let ok = replies.iter().filter(|(s, _)| *s == 200).count();
    let overloaded = replies
        .iter()
        .filter(|(s, h)| *s == 503 && h.as_deref() == Some("true"))
        .count();
    assert_eq!(ok + overloaded, 40, "{replies:?}\n{}", gateway.log());
    // One active and one waiting at a time: most of 40 simultaneous
    // requests overflow, and they are refused at once, not queued.
    assert!(
        ok >= 1 && overloaded >= 30,
        "ok={ok} overloaded={overloaded}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let check = check(dir.path());
    assert!(check.success(), "{}", check.combined());
}

#[test]
fn breaker_settings_are_checked() {
    let dir = tempdir();
    let resources =
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: odd\n\
         spec:\n  hostname: \"*\"\n  prefix: /odd/\n  service: quote\n  circuit_breakers:\n  \
         - priority: urgent\n  - max_connections: 0\n";
    write_gateway(dir.path(), free_port(), free_port(), resources);
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    assert!(
        out.stdout
            .contains("spec.circuit_breakers[0].priority: unknown priority \"urgent\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("spec.circuit_breakers[1].max_connections: 0 would refuse every request"),
        "{}",
        out.stdout
    );

    // A misspelt threshold is an error naming it and the fields it could be.
    let typo = resources.replace("max_connections: 0", "max_connectons: 5");
    write_gateway(dir.path(), free_port(), free_port(), &typo);
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    assert!(
        out.stdout.contains("spec.circuit_breakers[1].max_connectons: unknown field `max_connectons`, expected one of"),
        "{}",
        out.stdout
    );
}

/// A long request keeps its snapshot alive across a reload; the breaker of
/// its cluster must be the new snapshot's too, or every reload would add
/// `max_connections` more places.
#[test]
fn a_reload_does_not_multiply_a_breaker() {
    let dir = tempdir();
    let echo = Echo::plain("slow");
    let port = free_port();
    let guarded = format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: guarded\n\
         spec:\n  hostname: \"*\"\n  prefix: /guarded/\n  service: 127.0.0.1:{}\n  \
         timeout_ms: 10000\n  circuit_breakers:\n  - max_connections: 1\n    \
         max_pending_requests: 0\n",
        echo.port()
    );
    write_gateway(dir.path(), port, free_port(), &guarded);
    let gateway = Gateway::start(dir.path());
    let generation = || gateway.metric("pingress_config_generation").unwrap_or(0.0);

    let long = thread::spawn(move || {
        Request::get("/guarded/long")
            .header("x-echo-delay-ms", "4000")
            .timeout(Duration::from_secs(10))
            .send(port)
            .status
    });
    thread::sleep(Duration::from_millis(500));
    for reload in 1..=3 {
        let before = generation();
        let other = format!(
            "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  \
             name: other{reload}\nspec:\n  hostname: \"*\"\n  prefix: /other{reload}/\n  \
             service: 127.0.0.1:{}\n",
            echo.port()
        );
        std::fs::write(
            dir.path().join("resources").join("test.yaml"),
            std::fs::read_to_string(dir.path().join("resources").join("test.yaml")).unwrap()
                + &other,
        )
        .unwrap();
        assert!(
            poll_until(Duration::from_secs(10), || generation() > before),
            "reload {reload} was not applied:\n{}",
            gateway.log()
        );
    }
    // The long request still holds the one place.
    let second = Request::get("/guarded/second").send(port);
    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(second.header("x-envoy-overloaded"), Some("true"));
    assert_eq!(long.join().unwrap(), 200);
    assert_eq!(Request::get("/guarded/after").send(port).status, 200);
}
