//! `keepalive` (Mapping, else Module): TCP keepalive on upstream
//! connections, seen from the kernel's side: a pooled connection with it
//! runs a keepalive timer of `idle_time` (in /proc/net/tcp), one without
//! runs none.

mod support;

use support::*;

/// The timer of the gateway's established connection to `port`:
/// (timer kind, seconds until it fires). Kind 2 is keepalive.
fn upstream_timer(port: u16) -> Option<(u32, f64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let remote_port = u16::from_str_radix(fields.get(2)?.rsplit(':').next()?, 16).ok()?;
        if remote_port != port || *fields.get(3)? != "01" {
            return None;
        }
        let (kind, when) = fields.get(5)?.split_once(':')?;
        let ticks = u64::from_str_radix(when, 16).ok()?;
        // /proc reports clock ticks of USER_HZ, 100 on Linux.
        Some((u32::from_str_radix(kind, 16).ok()?, ticks as f64 / 100.0))
    })
}

#[test]
fn upstream_connections_keep_alive_as_asked() {
    let (kept, plain, inherited) = (
        Echo::plain("kept"),
        Echo::plain("plain"),
        Echo::plain("inh"),
    );
    let resources = [
        doc(
            "Module",
            "name: ambassador",
            "config:\n  keepalive:\n    idle_time: 30",
        ),
        mapping(
            "kept",
            "",
            "/kept/",
            &kept,
            "hostname: \"*\"\nkeepalive:\n  idle_time: 60\n  interval: 5\n  probes: 3",
        ),
        mapping(
            "plain",
            "",
            "/plain/",
            &plain,
            "hostname: \"*\"\nkeepalive: {idle_time: 7200, interval: 75, probes: 9}",
        ),
        mapping(
            "inherited",
            "",
            "/inherited/",
            &inherited,
            "hostname: \"*\"",
        ),
    ]
    .concat();
    let dir = tempdir();
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), &resources);
    let gateway = Gateway::start(dir.path());
    for path in ["/kept/", "/plain/", "/inherited/"] {
        Request::get(path).send(port).echo_ok();
    }

    let timer = upstream_timer(kept.port());
    assert!(
        matches!(timer, Some((2, s)) if s > 50.0 && s <= 60.0),
        "{timer:?}\n{}",
        gateway.log()
    );
    let timer = upstream_timer(inherited.port());
    assert!(
        matches!(timer, Some((2, s)) if s > 20.0 && s <= 30.0),
        "{timer:?}"
    );
    // The system's default idle time: two hours.
    let timer = upstream_timer(plain.port());
    assert!(matches!(timer, Some((2, s)) if s > 7000.0), "{timer:?}");
}

#[test]
fn keepalive_settings_are_checked() {
    let dir = tempdir();
    let resources = doc(
        "Mapping",
        "name: zero",
        "hostname: \"*\"\nprefix: /z/\nservice: 127.0.0.1:9\n\
         keepalive:\n  idle_time: 0\n  probes: 500",
    );
    write_gateway(dir.path(), free_port(), free_port(), &resources);
    let out = check(dir.path());
    for expected in [
        "Mapping default/zero: spec.keepalive.idle_time: 0 seconds is outside 1 to 32767",
        "Mapping default/zero: spec.keepalive.probes: 500 probes is outside 1 to 127",
    ] {
        assert!(out.stdout.contains(expected), "{expected}\n{}", out.stdout);
    }
}
