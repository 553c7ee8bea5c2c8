//! The key-coverage tests of the resource kinds (issue 15): a key that the
//! serde model of a spec accepts and then ignores is a silent defect, so
//! each key must change what validation makes of a resource, or draw a
//! warning that names it. These are the parts the kinds share.

use std::fmt::Debug;
use std::path::Path;

use serde_yaml::Value;

use super::spec::assert_used_or_named;
use super::Model;
use crate::config::diagnostics::Diagnostic;
use crate::config::load::parse_documents;
use crate::filters::Registry;

/// A `getambassador.io` resource document with `spec` (block YAML).
pub(crate) fn document(kind: &str, name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: {kind}\nmetadata:\n  name: {name}\n\
         spec:\n{spec}"
    )
}

/// A Secret in the `default` namespace holding `entries` as stringData.
pub(crate) fn secret(name: &str, entries: &[(&str, &str)]) -> String {
    let entries: String = entries
        .iter()
        .map(|(key, value)| format!("  {key}: {}\n", serde_json::json!(value)))
        .collect();
    format!("---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\nstringData:\n{entries}")
}

/// PEM of a certificate, its key, and a CRL that key signed.
pub(crate) struct SelfSigned {
    pub cert: String,
    pub key: String,
    pub crl: String,
}

/// A certificate for `cn`, signed by its own key, valid for a day: what
/// the keys that name Secrets and files need to be read at all.
pub(crate) fn self_signed(cn: &str) -> SelfSigned {
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::extension::{AuthorityKeyIdentifier, CrlNumber, SubjectKeyIdentifier};
    use openssl::x509::{X509CrlBuilder, X509Name, X509};

    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = X509Name::builder().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    cert.set_subject_name(&name).unwrap();
    cert.set_issuer_name(&name).unwrap();
    cert.set_pubkey(&key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    let id = SubjectKeyIdentifier::new()
        .build(&cert.x509v3_context(None, None))
        .unwrap();
    cert.append_extension(id).unwrap();
    cert.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = cert.build();
    let mut crl = X509CrlBuilder::new().unwrap();
    crl.set_issuer_name(&name).unwrap();
    crl.set_last_update(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    crl.set_next_update(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    let issuer = AuthorityKeyIdentifier::new()
        .keyid(true)
        .build(&X509::builder().unwrap().x509v3_context(Some(&cert), None))
        .unwrap();
    crl.append_extension(issuer).unwrap();
    let number = CrlNumber::new(BigNum::from_u32(1).unwrap()).unwrap();
    crl.append_extension(number.build().unwrap()).unwrap();
    crl.sign(&key, MessageDigest::sha256()).unwrap();
    let pem = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    SelfSigned {
        cert: pem(cert.to_pem().unwrap()),
        key: pem(key.private_key_to_pem_pkcs8().unwrap()),
        crl: pem(crl.build().unwrap().to_pem().unwrap()),
    }
}

/// The model and diagnostics of `yaml`, as the `default` instance.
pub(crate) fn validate_yaml(yaml: &str, registry: &Registry) -> (Model, Vec<Diagnostic>) {
    let (mut raws, mut diags) = (Vec::new(), Vec::new());
    parse_documents(Path::new("keys.yaml"), yaml, &mut raws, &mut diags);
    let (model, more) = super::validate(&raws, "default", registry);
    diags.extend(more);
    (model, diags)
}

/// `fragments` (YAML mappings) merged into `base` in turn: mappings key by
/// key and lists item by item, so a fragment can reach into the first
/// item of a list (`limits: [{rate: 5}]`); `~` leaves a key as good as
/// absent.
pub(crate) fn merged(base: &str, fragments: &[&str]) -> String {
    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Mapping(into), Value::Mapping(from)) => {
                for (key, value) in from {
                    match into.get_mut(&key) {
                        Some(slot) => merge(slot, value),
                        None => {
                            into.insert(key, value);
                        }
                    }
                }
            }
            (Value::Sequence(into), Value::Sequence(from)) => {
                for (index, value) in from.into_iter().enumerate() {
                    match into.get_mut(index) {
                        Some(slot) => merge(slot, value),
                        None => into.push(value),
                    }
                }
            }
            (into, from) => *into = from,
        }
    }
    let mut spec: Value = serde_yaml::from_str(base).unwrap();
    for fragment in fragments.iter().filter(|f| !f.is_empty()) {
        merge(&mut spec, serde_yaml::from_str(fragment).unwrap());
    }
    match spec {
        Value::Null => String::new(),
        spec => serde_yaml::to_string(&spec).unwrap(),
    }
}

/// Serde lists no fields for a struct with a `flatten`, so they are read
/// from its `{:#?}` form; a field added to a spec without a sample then
/// fails its test. Names compare without `_` and case: a key is its
/// field's name in camelCase, or without a leading `_`.
pub(crate) fn assert_fields_listed(prefix: &str, spec: &dyn Debug, keys: &[&str]) {
    let plain = |key: &str| key.replace('_', "").to_ascii_lowercase();
    let keys: Vec<String> = keys.iter().map(|k| plain(k)).collect();
    let debug = format!("{spec:#?}");
    let fields: Vec<&str> = debug
        .lines()
        .filter_map(|line| line.strip_prefix("    "))
        .filter(|line| !line.starts_with(' '))
        .filter_map(|line| Some(line.split_once(": ")?.0))
        // The flattened map of the keys serde does not know.
        .filter(|field| *field != "other")
        .collect();
    assert!(!fields.is_empty(), "no fields in {debug}");
    for field in fields {
        assert!(
            keys.contains(&plain(&format!("{prefix}{field}"))),
            "`{prefix}{field}` has no sample"
        );
    }
}

/// One kind's key-coverage table. A key is its path of names within the
/// spec, list items left out: `include_body.max_bytes`.
#[derive(Default)]
pub(crate) struct Coverage<'a> {
    /// The spec every sample is merged into (YAML).
    pub base: &'a str,
    /// The keys the validator knows (its `SUPPORTED`): each needs a sample.
    pub listed: &'a [&'a str],
    /// Keys pingress does not act on yet, each warned about when it takes
    /// `1`, unless it has a sample of its own.
    pub later: &'a [&'a str],
    /// `(key, what it needs to mean anything, sample)`, merged into `base`.
    pub samples: &'a [(&'a str, &'a str, &'a str)],
    /// `(key, sample)` of keys whose every value but the default is
    /// refused: the sample draws an error that names the key.
    pub refused: &'a [(&'a str, &'a str)],
    /// The serde structs of the spec, each with the path where it sits
    /// (`""`, `include_body.`): every field needs a sample.
    pub specs: &'a [(&'a str, &'a dyn Debug)],
}

impl Coverage<'_> {
    /// `result` gives what validation made of a spec, as comparable text,
    /// and the diagnostics.
    pub fn check(&self, result: impl Fn(&str) -> (String, Vec<Diagnostic>)) {
        let run = |fragments: &[&str]| result(&merged(self.base, fragments));
        let errors = |diags: &[Diagnostic]| -> Vec<String> {
            diags
                .iter()
                .filter(|d| d.is_error())
                .map(|d| format!("{:?}: {}", d.field, d.message))
                .collect()
        };
        let (plain, diags) = run(&[]);
        assert!(errors(&diags).is_empty(), "base: {:?}", errors(&diags));
        // The comparisons below mean something only if equal input gives
        // equal text.
        assert_eq!(plain, run(&[]).0);

        let mut keys: Vec<&str> = self.listed.iter().chain(self.later).copied().collect();
        keys.extend(self.samples.iter().map(|(key, ..)| *key));
        keys.extend(self.refused.iter().map(|(key, _)| *key));
        keys.sort_unstable();
        keys.dedup();
        for (prefix, spec) in self.specs {
            assert_fields_listed(prefix, *spec, &keys);
        }
        for key in keys {
            let name = key.rsplit('.').next().unwrap_or(key);
            if let Some((_, sample)) = self.refused.iter().find(|(k, _)| *k == key) {
                let (_, diags) = run(&[sample]);
                let named = diags
                    .iter()
                    .any(|d| d.is_error() && d.field.as_deref().is_some_and(|f| f.contains(name)));
                assert!(named, "`{key}` ({sample}) is not refused: {diags:?}");
                continue;
            }
            let later = format!("{key}: 1");
            let (needs, sample) = match self.samples.iter().find(|(k, ..)| *k == key) {
                Some((_, needs, sample)) => (*needs, *sample),
                None if self.later.contains(&key) => ("", later.as_str()),
                None => panic!("no sample for `{key}`"),
            };
            let (before, _) = run(&[needs]);
            let (after, diags) = run(&[needs, sample]);
            assert!(errors(&diags).is_empty(), "{key}: {:?}", errors(&diags));
            assert_used_or_named(name, after != before, &diags);
        }
    }
}
