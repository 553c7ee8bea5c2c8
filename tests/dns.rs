//! The service resolver's DNS: names are resolved before a snapshot
//! serves and refreshed in the background, never on the request path.
//! (`localhost` comes from the hosts file, so no DNS server is asked.)

mod support;

use support::*;

#[test]
fn a_named_service_serves_from_the_first_request_and_across_reloads() {
    let dir = tempdir();
    let echo = Echo::plain("named");
    let named = |prefix: &str, extra: &str| {
        doc(
            "Mapping",
            &format!("name: {}", prefix.trim_matches('/')),
            &format!(
                "hostname: \"*\"\nprefix: {prefix}\nservice: localhost:{}\n{extra}",
                echo.port()
            ),
        )
    };
    let port = free_port();
    let first = [
        named("/strict/", ""),
        named("/ttl/", "respect_dns_ttl: true\ndns_type: logical_dns"),
    ]
    .concat();
    write_gateway(dir.path(), port, free_port(), &first);
    let gateway = Gateway::start(dir.path());
    for prefix in ["/strict/", "/ttl/"] {
        let reply = Request::get(prefix).send(port);
        assert_eq!(reply.echo_ok().server(), "named", "{}", gateway.log());
    }
    // A new name after a reload is resolved before the new snapshot serves.
    std::fs::write(
        dir.path().join("resources").join("late.yaml"),
        named("/late/", ""),
    )
    .expect("write late.yaml");
    let live = poll_until(std::time::Duration::from_secs(10), || {
        Request::get("/late/").send(port).status != 404
    });
    assert!(live, "{}", gateway.log());
    assert_eq!(
        Request::get("/late/").send(port).echo_ok().server(),
        "named"
    );
    assert_eq!(Request::get("/strict/").send(port).status, 200);
}
