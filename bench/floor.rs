//! The floor of issue 7's benchmark: a bare Pingora proxy doing the same
//! job as the benchmarked proxies with nothing else, built with pingress's
//! release profile. `/m/...` goes to the mutual-TLS origin (client
//! certificate, CA, SNI, verification), anything else to the plain origin;
//! an optional TLS listener serves S3.
//!
//! Configured by the environment, as `bench/run` starts it:
//! `FLOOR_HTTP`, `FLOOR_HTTPS` + `FLOOR_EDGE_CERT` + `FLOOR_EDGE_KEY`,
//! `FLOOR_PLAIN`, `FLOOR_MTLS`, `FLOOR_CLIENT_CERT`, `FLOOR_CLIENT_KEY`,
//! `FLOOR_CA`, `FLOOR_SNI`; and Pingora's `-c` for threads.

use std::sync::Arc;

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::Opt;
use pingora::tls::pkey::PKey;
use pingora::tls::x509::X509;
use pingora::utils::tls::CertKey;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

fn read(name: &str) -> Vec<u8> {
    let path = env(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{name}={path}: {e}"))
}

/// The same allocator as the pingress binary, so the floor differs from it
/// by the gateway's logic alone.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Floor {
    plain: HttpPeer,
    mtls: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let peer = if session.req_header().uri.path().starts_with("/m/") {
            &self.mtls
        } else {
            &self.plain
        };
        Ok(Box::new(peer.clone()))
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    pingora: Opt,
}

fn main() {
    let cli = Cli::parse();
    let plain = HttpPeer::new(env("FLOOR_PLAIN").as_str(), false, String::new());
    let mut mtls = HttpPeer::new(env("FLOOR_MTLS").as_str(), true, env("FLOOR_SNI"));
    let certs = X509::stack_from_pem(&read("FLOOR_CLIENT_CERT")).expect("client certificate");
    let key = PKey::private_key_from_pem(&read("FLOOR_CLIENT_KEY")).expect("client key");
    mtls.client_cert_key = Some(Arc::new(CertKey::new(certs, key)));
    let ca = X509::stack_from_pem(&read("FLOOR_CA")).expect("CA");
    mtls.options.ca = Some(Arc::new(ca.into_boxed_slice()));
    mtls.options.verify_cert = true;
    mtls.options.verify_hostname = true;

    let mut server = Server::new(Some(cli.pingora)).expect("server");
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Floor { plain, mtls });
    proxy.add_tcp(&env("FLOOR_HTTP"));
    if let Ok(https) = std::env::var("FLOOR_HTTPS") {
        proxy
            .add_tls(&https, &env("FLOOR_EDGE_CERT"), &env("FLOOR_EDGE_KEY"))
            .expect("TLS listener");
    }
    server.add_service(proxy);
    server.run_forever();
}
