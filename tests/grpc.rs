//! `grpc: true` speaks HTTP/2 to the upstream (h2c in cleartext), and
//! cleartext listeners take HTTP/2 with prior knowledge, as gRPC clients
//! send it: end to end with curl and an nginx h2c upstream.

mod support;

use std::process::Command;

use support::*;

#[test]
fn grpc_mappings_speak_http2_to_the_upstream() {
    let dir = tempdir();
    let upstream = Nginx::h2c();
    let port = free_port();
    let resources = format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: grpc\n\
         spec:\n  hostname: \"*\"\n  prefix: /echo.Echo/\n  rewrite: \"\"\n  grpc: true\n  \
         service: 127.0.0.1:{}\n",
        upstream.port()
    );
    write_gateway(dir.path(), port, free_port(), &resources);
    let gateway = Gateway::start(dir.path());

    // h2c with prior knowledge downstream, as a gRPC client connects.
    let output = Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "-",
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{port}/echo.Echo/Say"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.ends_with("2 200"), "{text}\n{}", gateway.log());
    assert!(text.starts_with("hello from nginx"), "{text}");
    // The upstream was spoken to over HTTP/2 as well.
    assert!(
        poll_until(std::time::Duration::from_secs(5), || upstream
            .access_log()
            .contains("\"POST /echo.Echo/Say HTTP/2.0\"")
            || upstream
                .access_log()
                .contains("\"GET /echo.Echo/Say HTTP/2.0\"")),
        "{}",
        upstream.access_log()
    );
    // HTTP/1.1 clients still work on the same listener.
    assert_eq!(Request::get("/echo.Echo/Say").send(port).status, 200);
}
