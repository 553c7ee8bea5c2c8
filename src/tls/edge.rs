//! TLS termination for one Host: its certificate and client-certificate
//! verification, ready for handshakes, and what a handshake tells the
//! requests on its connection (the Host it chose, the client's identity).
//! Which Host a handshake gets is the serving side's choice
//! (`downstream::tls`).

use std::sync::{Arc, Mutex, OnceLock};

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::stack::Stack;
use pingora::tls::ext::{
    ssl_add_chain_cert, ssl_set_verify_cert_store, ssl_use_certificate, ssl_use_private_key,
};
use pingora::tls::ssl::SslFiletype;
use pingora::tls::ssl::{NameType, Ssl, SslRef, SslVerifyMode};
use pingora::tls::x509::store::{X509Lookup, X509Store, X509StoreBuilder};
use pingora::tls::x509::verify::X509VerifyFlags;
use pingora::tls::x509::X509StoreContext;
use pingora::tls::x509::{X509Name, X509NameRef, X509};

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
    pub fn new(context: Arc<TlsContext>) -> Result<EdgeTls, EdgeTlsError> {
        let (verify_store, client_ca_names) = match &context.ca {
            Some(cas) => {
                let mut builder = X509StoreBuilder::new().map_err(EdgeTlsError::Store)?;
                let mut names = Vec::new();
                for ca in cas.iter() {
                    builder
                        .add_cert(ca.clone())
                        .map_err(EdgeTlsError::CaCertificate)?;
                    names.push(ca.subject_name().to_owned().map_err(EdgeTlsError::CaName)?);
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
            ca_der.extend(ca.to_der().map_err(EdgeTlsError::CaCertificate)?);
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
                .map_err(EdgeTlsError::Certificate)?,
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

    /// Puts this Host's client-certificate policy, then its certificate,
    /// on a connection in the middle of its handshake. The certificate
    /// comes last: if any step fails, the handshake has none and fails,
    /// rather than go on without the policy.
    fn install(&self, ssl: &mut SslRef) -> Result<(), HandshakeError> {
        let cert_key = self
            .context
            .cert_key
            .as_ref()
            .ok_or(HandshakeError::NoCertificate)?;
        // The listener's acceptor allows the loosest bounds of its Hosts,
        // as they were when it started: each Host's own are held here,
        // where the version is settled and no certificate given yet.
        if let Some(version) = ssl.version2() {
            if self.context.version_allowed(version) != std::cmp::Ordering::Equal {
                return Err(HandshakeError::Version);
            }
        }
        if let Some(ciphers) = &self.cipher_list {
            ssl.set_cipher_list(ciphers)
                .map_err(HandshakeError::Ciphers)?;
        }
        if let Some(store) = &self.verify_store {
            let mut mode = SslVerifyMode::PEER;
            if self.context.cert_required {
                mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
            }
            ssl.set_verify(mode);
            ssl_set_verify_cert_store(ssl, store).map_err(HandshakeError::ClientCa)?;
            let mut names = Stack::new().map_err(HandshakeError::CaNames)?;
            for name in &self.client_ca_names {
                let owned = X509NameRef::to_owned(name).map_err(HandshakeError::CaNames)?;
                names.push(owned).map_err(HandshakeError::CaNames)?;
            }
            ssl.set_client_ca_list(names);
        }
        ssl_use_certificate(ssl, cert_key.leaf()).map_err(HandshakeError::Certificate)?;
        ssl_use_private_key(ssl, cert_key.key()).map_err(HandshakeError::Key)?;
        for intermediate in cert_key.intermediates() {
            ssl_add_chain_cert(ssl, intermediate).map_err(HandshakeError::Chain)?;
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
fn add_crl(builder: &mut X509StoreBuilder, pem: &[u8]) -> Result<(), EdgeTlsError> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let fd = nix::sys::memfd::memfd_create(c"pingress-crl", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(EdgeTlsError::CrlFile)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(pem).map_err(EdgeTlsError::CrlWrite)?;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    builder
        .add_lookup(X509Lookup::file())
        .and_then(|lookup| lookup.load_crl_file(&path, SslFiletype::PEM))
        .map_err(EdgeTlsError::Crl)?;
    // Emissary's CRL must cover every CA in the chain.
    builder
        .set_flags(X509VerifyFlags::CRL_CHECK | X509VerifyFlags::CRL_CHECK_ALL)
        .map_err(EdgeTlsError::Crl)
}

/// A Host's TLS that cannot be made ready for handshakes.
#[derive(Debug, thiserror::Error)]
pub enum EdgeTlsError {
    #[error(transparent)]
    Store(ErrorStack),
    #[error("CA certificate: {0}")]
    CaCertificate(ErrorStack),
    #[error(transparent)]
    CaName(ErrorStack),
    #[error("CRL: {0}")]
    CrlFile(nix::Error),
    #[error("CRL: {0}")]
    CrlWrite(std::io::Error),
    #[error("CRL: {0}")]
    Crl(ErrorStack),
    #[error("certificate: {0}")]
    Certificate(ErrorStack),
}

/// A Host's TLS that cannot be put on a handshake in progress.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the Host has no certificate")]
    NoCertificate,
    #[error("the negotiated TLS version is outside the Host's min/max_tls_version")]
    Version,
    #[error("cipher_suites: {0}")]
    Ciphers(ErrorStack),
    #[error("client CA: {0}")]
    ClientCa(ErrorStack),
    #[error(transparent)]
    CaNames(ErrorStack),
    #[error("certificate: {0}")]
    Certificate(ErrorStack),
    #[error("key: {0}")]
    Key(ErrorStack),
    #[error("chain: {0}")]
    Chain(ErrorStack),
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

/// How a connection's handshake stands with the TLS its Host has now: a
/// TLS connection outlives the configuration its handshake followed, and a
/// reload may have made the Host require client certificates, changed its
/// CA or revoked a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The handshake the Host would make now.
    Current,
    /// The Host's TLS changed, but its client policy still admits the
    /// connection: it may finish what it does, then handshake again.
    Outdated,
    /// The Host now requires a client certificate the connection lacks.
    CertificateNowRequired,
    /// The Host's current CA or CRL refuse the connection's certificate.
    CertificateRefused,
    /// No TLS for this name any more (the Host is gone, or its TLS could
    /// not be built).
    NoTls,
}

impl EdgeSession {
    /// How this connection stands with `now`, the TLS its SNI's Host has
    /// in the configuration that serves.
    pub fn standing(&self, now: Option<&EdgeTls>) -> Standing {
        let Some(seen) = self.identity else {
            return Standing::Current;
        };
        let Some(now) = now else {
            return Standing::NoTls;
        };
        if now.identity == seen {
            return Standing::Current;
        }
        if now.identity.client_policy != seen.client_policy && now.verifies_clients() {
            if self.client.is_none() && now.context.cert_required {
                return Standing::CertificateNowRequired;
            }
            if !self.accepted_by(now) {
                return Standing::CertificateRefused;
            }
        }
        Standing::Outdated
    }

    /// Whether `edge`'s current CA and CRL accept this connection's client
    /// certificate (true without one: `cert_required` is the caller's).
    fn accepted_by(&self, edge: &EdgeTls) -> bool {
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
pub fn check_identity_index() -> Result<(), NoIdentityIndex> {
    identity_index().map(|_| ()).ok_or(NoIdentityIndex)
}

/// OpenSSL made no ex_data index for the handshake identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("OpenSSL gave no ex_data index for TLS handshakes")]
pub struct NoIdentityIndex;

/// The SNI a handshake carries, lowercased.
pub fn sni(ssl: &SslRef) -> Option<String> {
    ssl.servername(NameType::HOST_NAME)
        .map(str::to_ascii_lowercase)
}

impl EdgeTls {
    /// Makes the handshake in progress this Host's: its certificate and
    /// client policy, and the identity requests will be held to.
    pub fn take_handshake(&self, ssl: &mut SslRef) -> Result<(), HandshakeError> {
        self.install(ssl)?;
        if let Some(index) = identity_index() {
            ssl.set_ex_data(index, self.identity);
        }
        Ok(())
    }
}

impl EdgeSession {
    /// What a completed handshake established. The client's chain is read
    /// as it was sent: verification already passed, or the handshake would
    /// not have completed.
    pub fn of_handshake(ssl: &SslRef) -> EdgeSession {
        let client = ssl.peer_certificate().and_then(|cert| {
            let chain: Vec<X509> = ssl
                .peer_cert_chain()
                .map(|c| c.iter().map(|x| x.to_owned()).collect())
                .unwrap_or_default();
            PeerCert::from_x509(&cert, &chain)
        });
        EdgeSession {
            sni: sni(ssl),
            client,
            identity: identity_index().and_then(|index| ssl.ex_data(index).copied()),
            verdict: Mutex::default(),
        }
    }
}
