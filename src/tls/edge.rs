//! TLS termination: the certificate of the Host that SNI names, chosen in
//! the handshake from the current snapshot (so a new snapshot is served on
//! the next handshake), client-certificate verification per Host, and what
//! the handshake tells requests (the Host it chose, the client's identity).

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::{debug, warn};
use openssl::ex_data::Index;
use openssl::stack::Stack;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::ext::{
    ssl_add_chain_cert, ssl_set_verify_cert_store, ssl_use_certificate, ssl_use_private_key,
};
use pingora::tls::ssl::SslFiletype;
use pingora::tls::ssl::{NameType, Ssl, SslRef, SslVerifyMode};
use pingora::tls::x509::store::{X509Lookup, X509Store, X509StoreBuilder};
use pingora::tls::x509::verify::X509VerifyFlags;
use pingora::tls::x509::X509StoreContext;
use pingora::tls::x509::{X509Name, X509NameRef, X509};

use crate::snapshot::Snapshot;

use super::TlsContext;

/// A Host's TLS, ready for handshakes: built once per snapshot.
pub struct EdgeTls {
    pub context: Arc<TlsContext>,
    /// Client-certificate trust, when the context has a CA.
    verify_store: Option<X509Store>,
    /// CA names sent in the CertificateRequest.
    client_ca_names: Vec<X509Name>,
    cipher_list: Option<String>,
    /// What a handshake with this Host establishes, for the requests that
    /// come on its connection after a reload.
    pub identity: HandshakeIdentity,
}

/// Digests of what a handshake established: everything it used, and the
/// part that decided which clients it let in (CA, CRL, `cert_required`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeIdentity {
    pub whole: u64,
    pub client_policy: u64,
}

impl std::fmt::Debug for EdgeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeTls")
            .field("context", &self.context.name)
            .finish()
    }
}

impl EdgeTls {
    pub fn new(context: Arc<TlsContext>) -> Result<EdgeTls, String> {
        let (verify_store, client_ca_names) = match &context.ca {
            Some(cas) => {
                let mut builder = X509StoreBuilder::new().map_err(|e| e.to_string())?;
                let mut names = Vec::new();
                for ca in cas.iter() {
                    builder
                        .add_cert(ca.clone())
                        .map_err(|e| format!("CA certificate: {e}"))?;
                    names.push(ca.subject_name().to_owned().map_err(|e| e.to_string())?);
                }
                if let Some(crl) = &context.crl {
                    add_crl(&mut builder, crl)?;
                }
                (Some(builder.build()), names)
            }
            None => (None, Vec::new()),
        };
        let cipher_list =
            (!context.cipher_suites.is_empty()).then(|| context.cipher_suites.join(":"));
        let mut ca_der = Vec::new();
        for ca in context.ca.iter().flat_map(|cas| cas.iter()) {
            ca_der.extend(ca.to_der().map_err(|e| format!("CA certificate: {e}"))?);
        }
        let crl = context.crl.as_deref().map_or(&[][..], Vec::as_slice);
        let client_policy =
            super::identity_digest(&[&ca_der, crl, &[u8::from(context.cert_required)]]);
        // A Host's own tlsSecret comes without a context identity of its
        // own: the certificate is hashed here.
        let leaf = match &context.cert_key {
            Some(cert_key) => cert_key
                .leaf()
                .to_der()
                .map_err(|e| format!("certificate: {e}"))?,
            None => Vec::new(),
        };
        let identity = HandshakeIdentity {
            whole: super::identity_digest(&[
                &context.identity.to_be_bytes(),
                &leaf,
                &client_policy.to_be_bytes(),
                cipher_list.as_deref().unwrap_or_default().as_bytes(),
            ]),
            client_policy,
        };
        Ok(EdgeTls {
            context,
            verify_store,
            client_ca_names,
            cipher_list,
            identity,
        })
    }

    /// Whether the Host asks clients for certificates now.
    pub fn verifies_clients(&self) -> bool {
        self.verify_store.is_some()
    }

    /// Whether a client certificate that an earlier handshake verified
    /// passes this Host's CA and CRL now.
    fn accepts(&self, peer: &PeerCert) -> bool {
        let Some(store) = &self.verify_store else {
            return true;
        };
        let verified = || -> Result<bool, openssl::error::ErrorStack> {
            let cert = X509::from_pem(peer.pem.as_bytes())?;
            let mut chain = Stack::new()?;
            for link in X509::stack_from_pem(peer.chain_pem.as_bytes())? {
                chain.push(link)?;
            }
            let mut context = X509StoreContext::new()?;
            context.init(store, &cert, &chain, |c| c.verify_cert())
        };
        verified().unwrap_or(false)
    }

    /// Puts this Host's certificate and client-certificate policy on a
    /// connection in the middle of its handshake.
    fn install(&self, ssl: &mut SslRef) -> Result<(), String> {
        let cert_key = self
            .context
            .cert_key
            .as_ref()
            .ok_or("the Host has no certificate")?;
        ssl_use_certificate(ssl, cert_key.leaf()).map_err(|e| format!("certificate: {e}"))?;
        ssl_use_private_key(ssl, cert_key.key()).map_err(|e| format!("key: {e}"))?;
        for intermediate in cert_key.intermediates() {
            ssl_add_chain_cert(ssl, intermediate).map_err(|e| format!("chain: {e}"))?;
        }
        if let Some(ciphers) = &self.cipher_list {
            ssl.set_cipher_list(ciphers)
                .map_err(|e| format!("cipher_suites: {e}"))?;
        }
        if let Some(store) = &self.verify_store {
            let mut mode = SslVerifyMode::PEER;
            if self.context.cert_required {
                mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
            }
            ssl.set_verify(mode);
            ssl_set_verify_cert_store(ssl, store).map_err(|e| format!("client CA: {e}"))?;
            let mut names = Stack::new().map_err(|e| e.to_string())?;
            for name in &self.client_ca_names {
                let owned = X509NameRef::to_owned(name).map_err(|e| e.to_string())?;
                names.push(owned).map_err(|e| e.to_string())?;
            }
            ssl.set_client_ca_list(names);
        }
        Ok(())
    }

    /// Offers h2 only where the Host's context lists it, as Emissary does.
    pub fn allows_h2(&self) -> bool {
        self.context.alpn_protocols.iter().any(|p| p == "h2")
    }
}

/// OpenSSL's store reads CRLs only from files (rust-openssl has no
/// `X509_STORE_add_crl`). The PEM, validated with the configuration, goes
/// into an anonymous in-memory file that OpenSSL opens by its
/// `/proc/self/fd` path: no file in a shared directory that another user
/// could create first, swap or read.
fn add_crl(builder: &mut X509StoreBuilder, pem: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let problem = |e: &dyn std::fmt::Display| format!("CRL: {e}");
    let fd = nix::sys::memfd::memfd_create(c"pingress-crl", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| problem(&e))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(pem).map_err(|e| problem(&e))?;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    builder
        .add_lookup(X509Lookup::file())
        .and_then(|lookup| lookup.load_crl_file(&path, SslFiletype::PEM))
        .map_err(|e| problem(&e))?;
    // Emissary's CRL must cover every CA in the chain.
    builder
        .set_flags(X509VerifyFlags::CRL_CHECK | X509VerifyFlags::CRL_CHECK_ALL)
        .map_err(|e| problem(&e))
}

/// A verified client certificate, as requests and upstream headers see it.
#[derive(Debug, Clone)]
pub struct PeerCert {
    /// One line, e.g. `CN=alice,O=Example`.
    pub subject: String,
    /// SHA-256 of the DER, lower-case hex.
    pub sha256: String,
    pub pem: String,
    pub chain_pem: String,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    /// Validity bounds as seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl PeerCert {
    fn from_x509(cert: &X509, chain: &[X509]) -> Option<PeerCert> {
        let der = cert.to_der().ok()?;
        let sha256 = openssl::sha::sha256(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let pem = String::from_utf8(cert.to_pem().ok()?).ok()?;
        let chain_pem = chain
            .iter()
            .filter_map(|c| c.to_pem().ok())
            .filter_map(|p| String::from_utf8(p).ok())
            .collect();
        let (mut dns, mut uris) = (Vec::new(), Vec::new());
        for name in cert.subject_alt_names().iter().flatten() {
            if let Some(d) = name.dnsname() {
                dns.push(d.to_string());
            }
            if let Some(u) = name.uri() {
                uris.push(u.to_string());
            }
        }
        Some(PeerCert {
            subject: super::rfc2253(cert.subject_name()),
            sha256,
            pem,
            chain_pem,
            dns,
            uris,
            not_before: super::unix_time(cert.not_before())?,
            not_after: super::unix_time(cert.not_after())?,
        })
    }
}

/// What a TLS connection's handshake saw, kept with the connection. The
/// Host is found again from the SNI per request, so a request always binds
/// to the Host of the snapshot it is routed with.
#[derive(Debug)]
pub struct EdgeSession {
    pub sni: Option<String>,
    pub client: Option<PeerCert>,
    /// What the handshake established with the Host it chose.
    pub identity: Option<HandshakeIdentity>,
    /// The last client policy the certificate was checked against, and the
    /// verdict: an HTTP/2 connection asks once per policy, not per request.
    verdict: Mutex<Option<(u64, bool)>>,
}

impl EdgeSession {
    /// Whether `edge`'s current CA and CRL accept this connection's client
    /// certificate (true without one: `cert_required` is the caller's).
    pub fn accepted_by(&self, edge: &EdgeTls) -> bool {
        let Some(peer) = &self.client else {
            return true;
        };
        let policy = edge.identity.client_policy;
        let mut verdict = self.verdict.lock().unwrap_or_else(|p| p.into_inner());
        match *verdict {
            Some((checked, accepted)) if checked == policy => accepted,
            _ => {
                let accepted = edge.accepts(peer);
                *verdict = Some((policy, accepted));
                accepted
            }
        }
    }
}

/// Where the certificate callback leaves the identity of the Host it
/// installed, for the end of the same handshake. `None` only if OpenSSL
/// cannot make an index, which [`check_identity_index`] turns into a
/// refusal to start.
fn identity_index() -> Option<Index<Ssl, HandshakeIdentity>> {
    static INDEX: OnceLock<Option<Index<Ssl, HandshakeIdentity>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

/// Without the index, no request could be held to its Host's current
/// client-certificate policy.
pub fn check_identity_index() -> Result<(), String> {
    identity_index()
        .map(|_| ())
        .ok_or_else(|| "OpenSSL gave no ex_data index for TLS handshakes".into())
}

/// The handshake side of one TLS listener: HTTPS Hosts and TCPMappings'
/// hosts.
pub struct EdgeAcceptor {
    pub port: u16,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
}

fn sni(ssl: &SslRef) -> Option<String> {
    ssl.servername(NameType::HOST_NAME)
        .map(str::to_ascii_lowercase)
}

#[async_trait]
impl TlsAccept for EdgeAcceptor {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let snapshot = self.snapshot.load();
        let name = sni(ssl);
        // A TCPMapping's host wins over an HTTPS Host with the same name,
        // as in Emissary.
        let tunnel = snapshot
            .tcp_port(self.port)
            .and_then(|p| p.group(name.as_deref()))
            .and_then(|g| g.edge.as_ref());
        let host = || {
            snapshot
                .listener(self.port)
                .and_then(|l| l.tls_host(name.as_deref()))
                .map(|(_, edge)| edge)
        };
        let Some(edge) = tunnel.or_else(host) else {
            // No certificate: the handshake fails with an alert. A client
            // never gets a cleartext answer to a ClientHello.
            debug!("TLS on port {}: no TLS Host for SNI {name:?}", self.port);
            return;
        };
        if let Err(e) = edge.install(ssl) {
            warn!(
                "TLS on port {}: cannot use {}: {e}",
                self.port, edge.context.name
            );
        }
        if let Some(index) = identity_index() {
            ssl.set_ex_data(index, edge.identity);
        }
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let name = sni(ssl);
        // The chain as the client sent it; verification already passed, or
        // the handshake would not have completed.
        let client = ssl.peer_certificate().and_then(|cert| {
            let chain: Vec<X509> = ssl
                .peer_cert_chain()
                .map(|c| c.iter().map(|x| x.to_owned()).collect())
                .unwrap_or_default();
            PeerCert::from_x509(&cert, &chain)
        });
        let identity = identity_index().and_then(|index| ssl.ex_data(index).copied());
        Some(Arc::new(EdgeSession {
            sni: name,
            client,
            identity,
            verdict: Mutex::default(),
        }))
    }
}
