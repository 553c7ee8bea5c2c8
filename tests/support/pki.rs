//! Throwaway PKI minted with openssl: CAs, server and client certificates
//! (with exact identities or validity dates when a test needs them) and
//! CRLs.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, CrlNumber, ExtendedKeyUsage, KeyUsage,
    SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{X509CrlBuilder, X509Name, X509RevokedBuilder, X509};

/// Organization put in every test certificate subject.
pub const TEST_ORG: &str = "pingress tests";

/// A throwaway certificate authority writing PEM files into a directory.
pub struct Pki {
    dir: PathBuf,
    name: String,
    ca_cert: X509,
    ca_key: PKey<Private>,
    ca_pem: String,
    ca_pem_path: PathBuf,
    /// Keeps file names unique when the same CN is issued twice.
    seq: AtomicU32,
}

/// An issued certificate and its key, on disk and in memory.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// PEM chain, leaf first, then the issuing CA.
    pub cert: PathBuf,
    /// PKCS#8 PEM private key.
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    /// The leaf certificate alone.
    pub leaf_pem: String,
    /// Uppercase hex, no leading zero bytes (OpenSSL's BN_bn2hex form, as
    /// pingress-echo reports it).
    pub serial_hex: String,
    pub subject_cn: String,
}

impl CertFiles {
    /// Subject in the one-line form pingress-echo reports: `CN=..,O=..`.
    pub fn subject(&self) -> String {
        format!("CN={},O={TEST_ORG}", self.subject_cn)
    }

    /// The leaf certificate, parsed.
    pub fn leaf(&self) -> X509 {
        X509::from_pem(self.leaf_pem.as_bytes()).expect("leaf PEM parses")
    }
}

/// What a client certificate says about its holder, for tests of what the
/// gateway tells upstreams about it (XFCC, `%DOWNSTREAM_PEER_*%`).
#[derive(Clone, Debug)]
pub struct ClientIdentity<'a> {
    /// Subject attributes by short name in DER order, least specific first
    /// (`("C", "US")` .. `("CN", "alice")`), so RFC 2253 reads them back
    /// in reverse.
    pub subject: &'a [(&'a str, &'a str)],
    /// URI SANs, in order.
    pub uris: &'a [&'a str],
    /// DNS SANs, in order.
    pub dns: &'a [&'a str],
    /// Validity bounds, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

fn new_ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256 group");
    let ec = EcKey::generate(&group).expect("generate EC key");
    PKey::from_ec_key(ec).expect("wrap EC key")
}

/// What a leaf certificate says besides its key and serial.
struct Leaf<'a> {
    subject: X509Name,
    validity: (Asn1Time, Asn1Time),
    /// serverAuth, else clientAuth.
    server: bool,
    sans: Vec<San<'a>>,
}

enum San<'a> {
    Dns(&'a str),
    Ip(&'a str),
    Uri(&'a str),
}

fn subject_name(cn: &str) -> X509Name {
    let mut b = X509Name::builder().expect("name builder");
    // CN first so the one-line form reads `CN=..,O=..`.
    b.append_entry_by_nid(Nid::COMMONNAME, cn).expect("CN");
    b.append_entry_by_nid(Nid::ORGANIZATIONNAME, TEST_ORG)
        .expect("O");
    b.build()
}

fn random_serial() -> (openssl::asn1::Asn1Integer, String) {
    let mut bn = BigNum::new().expect("bignum");
    bn.rand(127, MsbOption::MAYBE_ZERO, false).expect("rand");
    let hex = bn.to_hex_str().expect("hex").to_string().to_uppercase();
    (bn.to_asn1_integer().expect("asn1 int"), hex)
}

/// Validity from an hour ago (tolerates small clock skew between processes)
/// to 30 days ahead.
fn validity() -> (Asn1Time, Asn1Time) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    (
        Asn1Time::from_unix(now - 3600).expect("not_before"),
        Asn1Time::from_unix(now + 30 * 24 * 3600).expect("not_after"),
    )
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

impl Pki {
    /// The default CA, `CN=pingress test CA`.
    pub fn new(dir: &Path) -> Pki {
        Pki::new_named(dir, "pingress")
    }

    /// An independent CA, `CN=<name> test CA`, e.g. `"rogue"` for
    /// certificates that must be rejected.
    pub fn new_named(dir: &Path, name: &str) -> Pki {
        fs::create_dir_all(dir).expect("create pki dir");
        let key = new_ec_key();
        let subject = subject_name(&format!("{name} test CA"));
        let (serial, _) = random_serial();
        let (nb, na) = validity();

        let mut b = X509::builder().expect("x509 builder");
        b.set_version(2).expect("version");
        b.set_serial_number(&serial).expect("serial");
        b.set_subject_name(&subject).expect("subject");
        b.set_issuer_name(&subject).expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&nb).expect("not_before");
        b.set_not_after(&na).expect("not_after");
        b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
            .expect("bc");
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .expect("ku"),
        )
        .expect("ku");
        let skid = SubjectKeyIdentifier::new()
            .build(&b.x509v3_context(None, None))
            .expect("skid");
        b.append_extension(skid).expect("skid");
        b.sign(&key, MessageDigest::sha256()).expect("sign CA");
        let cert = b.build();

        let ca_pem = String::from_utf8(cert.to_pem().expect("pem")).expect("utf8 pem");
        let ca_pem_path = dir.join(format!("{}-ca.crt", sanitize(name)));
        fs::write(&ca_pem_path, &ca_pem).expect("write CA pem");
        Pki {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            ca_cert: cert,
            ca_key: key,
            ca_pem,
            ca_pem_path,
            seq: AtomicU32::new(0),
        }
    }

    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Subject of the CA in pingress-echo's one-line form.
    pub fn ca_subject(&self) -> String {
        format!("CN={} test CA,O={TEST_ORG}", self.name)
    }

    /// A serverAuth certificate with CN `name`. `sans` entries that parse as
    /// IP addresses become IP SANs, the rest DNS SANs; an empty `sans` means
    /// `[name]`, since clients ignore the CN.
    pub fn issue_server(&self, name: &str, sans: &[&str]) -> CertFiles {
        let sans: Vec<&str> = if sans.is_empty() {
            vec![name]
        } else {
            sans.to_vec()
        };
        self.issue("server", name, &sans, true)
    }

    /// A clientAuth certificate with CN `cn` and no SANs.
    pub fn issue_client(&self, cn: &str) -> CertFiles {
        self.issue("client", cn, &[], false)
    }

    /// A serverAuth certificate for `name` (CN and DNS SAN) valid from
    /// `not_before` to `not_after`, in seconds since the Unix epoch; with a
    /// `not_after` in the past it is an expired certificate.
    pub fn issue_server_valid(&self, name: &str, not_before: i64, not_after: i64) -> CertFiles {
        let validity = (
            Asn1Time::from_unix(not_before).expect("not_before"),
            Asn1Time::from_unix(not_after).expect("not_after"),
        );
        let leaf = Leaf {
            subject: subject_name(name),
            validity,
            server: true,
            sans: vec![San::Dns(name)],
        };
        self.sign_leaf("dated", name, leaf)
    }

    /// A clientAuth certificate with exactly this subject, these SANs (URIs
    /// first, then DNS names) and validity.
    pub fn issue_client_identity(&self, id: &ClientIdentity) -> CertFiles {
        let mut name = X509Name::builder().expect("name builder");
        for (field, value) in id.subject {
            name.append_entry_by_text(field, value)
                .unwrap_or_else(|e| panic!("subject {field}={value}: {e}"));
        }
        let cn = id
            .subject
            .iter()
            .find(|(field, _)| *field == "CN")
            .map(|(_, value)| *value)
            .unwrap_or("client");
        let validity = (
            Asn1Time::from_unix(id.not_before).expect("not_before"),
            Asn1Time::from_unix(id.not_after).expect("not_after"),
        );
        let sans = id.uris.iter().map(|uri| San::Uri(uri));
        let leaf = Leaf {
            subject: name.build(),
            validity,
            server: false,
            sans: sans.chain(id.dns.iter().map(|dns| San::Dns(dns))).collect(),
        };
        self.sign_leaf("identity", cn, leaf)
    }

    /// A CRL this CA signed, valid from an hour ago for 30 days, revoking
    /// `revoked` (which this CA issued), as PEM.
    pub fn crl_pem(&self, revoked: &[&CertFiles]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        let mut b = X509CrlBuilder::new().expect("CRL builder");
        b.set_issuer_name(self.ca_cert.subject_name())
            .expect("CRL issuer");
        b.set_last_update(&Asn1Time::from_unix(now - 3600).expect("time"))
            .expect("lastUpdate");
        b.set_next_update(&Asn1Time::from_unix(now + 30 * 86_400).expect("time"))
            .expect("nextUpdate");
        let akid = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(
                &X509::builder()
                    .expect("x509 builder")
                    .x509v3_context(Some(&self.ca_cert), None),
            )
            .expect("CRL akid");
        b.append_extension(akid).expect("CRL akid");
        let number = CrlNumber::new(BigNum::from_u32(1).expect("bignum")).expect("CRL number");
        b.append_extension(number.build().expect("CRL number"))
            .expect("CRL number");
        for cert in revoked {
            let mut entry = X509RevokedBuilder::new().expect("revoked entry");
            entry
                .set_serial_number(cert.leaf().serial_number())
                .expect("revoked serial");
            entry
                .set_revocation_date(&Asn1Time::from_unix(now - 60).expect("time"))
                .expect("revocation date");
            b.add_revoked(entry.build()).expect("add revoked");
        }
        b.sign(&self.ca_key, MessageDigest::sha256())
            .expect("sign CRL");
        let crl = b.build().expect("CRL");
        String::from_utf8(crl.to_pem().expect("CRL PEM")).expect("utf8 PEM")
    }

    fn issue(&self, kind: &str, cn: &str, sans: &[&str], server: bool) -> CertFiles {
        let sans = sans.iter().map(|&s| match s.parse::<IpAddr>() {
            Ok(_) => San::Ip(s),
            Err(_) => San::Dns(s),
        });
        let leaf = Leaf {
            subject: subject_name(cn),
            validity: validity(),
            server,
            sans: sans.collect(),
        };
        self.sign_leaf(kind, cn, leaf)
    }

    /// Signs `leaf` with this CA and saves it under `kind` and `cn`.
    fn sign_leaf(&self, kind: &str, cn: &str, leaf: Leaf) -> CertFiles {
        let key = new_ec_key();
        let (serial, serial_hex) = random_serial();
        let mut b = X509::builder().expect("x509 builder");
        b.set_version(2).expect("version");
        b.set_serial_number(&serial).expect("serial");
        b.set_subject_name(&leaf.subject).expect("subject");
        b.set_issuer_name(self.ca_cert.subject_name())
            .expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&leaf.validity.0).expect("not_before");
        b.set_not_after(&leaf.validity.1).expect("not_after");
        b.append_extension(BasicConstraints::new().critical().build().expect("bc"))
            .expect("bc");
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .build()
                .expect("ku"),
        )
        .expect("ku");
        let mut eku = ExtendedKeyUsage::new();
        if leaf.server {
            eku.server_auth();
        } else {
            eku.client_auth();
        }
        b.append_extension(eku.build().expect("eku")).expect("eku");
        if !leaf.sans.is_empty() {
            let mut names = SubjectAlternativeName::new();
            for san in &leaf.sans {
                match san {
                    San::Dns(name) => names.dns(name),
                    San::Ip(ip) => names.ip(ip),
                    San::Uri(uri) => names.uri(uri),
                };
            }
            let ext = names
                .build(&b.x509v3_context(Some(&self.ca_cert), None))
                .expect("san");
            b.append_extension(ext).expect("san");
        }
        let skid = SubjectKeyIdentifier::new()
            .build(&b.x509v3_context(Some(&self.ca_cert), None))
            .expect("skid");
        b.append_extension(skid).expect("skid");
        let akid = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(&self.ca_cert), None))
            .expect("akid");
        b.append_extension(akid).expect("akid");
        b.sign(&self.ca_key, MessageDigest::sha256())
            .expect("sign leaf");
        self.save(kind, cn, &b.build(), &key, serial_hex)
    }

    /// Writes a leaf this CA signed (followed by the CA, as its chain) and
    /// its key under unique file names.
    fn save(
        &self,
        kind: &str,
        cn: &str,
        cert: &X509,
        key: &PKey<Private>,
        serial_hex: String,
    ) -> CertFiles {
        let leaf_pem = String::from_utf8(cert.to_pem().expect("pem")).expect("utf8 pem");
        let cert_pem = format!("{leaf_pem}{}", self.ca_pem);
        let key_pem =
            String::from_utf8(key.private_key_to_pem_pkcs8().expect("pkcs8")).expect("utf8 pem");
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let stem = format!("{}-{kind}-{n}-{}", sanitize(&self.name), sanitize(cn));
        let cert_path = self.dir.join(format!("{stem}.crt"));
        let key_path = self.dir.join(format!("{stem}.key"));
        fs::write(&cert_path, &cert_pem).expect("write cert");
        fs::write(&key_path, &key_pem).expect("write key");
        CertFiles {
            cert: cert_path,
            key: key_path,
            cert_pem,
            key_pem,
            leaf_pem,
            serial_hex,
            subject_cn: cn.to_string(),
        }
    }
}
