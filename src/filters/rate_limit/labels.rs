//! Rate-limit labels: label groups (Envoy's descriptors) whose entries a
//! request fills in. `model::rate_labels` parses a Mapping's `labels` and
//! the Module's `default_labels` into them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};

/// What `source_cluster` labels carry: Envoy's `--service-cluster`, which
/// for pingress is the gateway itself.
pub(crate) const SOURCE_CLUSTER: &str = "pingress";

/// One label specifier: how a request gets one entry of its label group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Specifier {
    Generic {
        key: Arc<str>,
        value: Arc<str>,
    },
    RemoteAddress,
    Header {
        key: Arc<str>,
        header: HeaderName,
        omit_if_not_present: bool,
    },
    SourceCluster,
    DestinationCluster,
}

/// A named list of specifiers; the name is for people only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelGroup {
    pub name: String,
    pub specifiers: Vec<Specifier>,
}

/// Label groups by domain.
pub(crate) type Labels = BTreeMap<String, Vec<LabelGroup>>;

/// The Module's `default_labels`: specifiers by domain.
pub(crate) type DefaultLabels = BTreeMap<String, Vec<Specifier>>;

/// What a request offers its label groups.
pub(crate) struct RequestLabels<'a> {
    pub headers: &'a HeaderMap,
    pub client_ip: Option<IpAddr>,
    /// The upstream cluster; `None` on redirect routes.
    pub destination: Option<&'a str>,
}

/// One label of a request: key and value.
pub(crate) type Entry<'a> = (&'a str, Cow<'a, str>);

impl LabelGroup {
    /// The group's labels for this request, or `None` when the group does
    /// not apply: a header it needs is missing (without
    /// `omit_if_not_present`), or there is no client address or cluster.
    pub fn entries<'a>(&'a self, request: &RequestLabels<'a>) -> Option<Vec<Entry<'a>>> {
        let mut entries = Vec::with_capacity(self.specifiers.len());
        for specifier in &self.specifiers {
            match specifier {
                Specifier::Generic { key, value } => {
                    entries.push((&**key, Cow::Borrowed(&**value)))
                }
                Specifier::RemoteAddress => {
                    let ip = request.client_ip?;
                    entries.push(("remote_address", Cow::Owned(ip.to_string())));
                }
                Specifier::Header {
                    key,
                    header,
                    omit_if_not_present,
                } => match request.headers.get(header).map(|v| v.to_str()) {
                    Some(Ok(value)) => entries.push((&**key, Cow::Borrowed(value))),
                    // A value that is not text cannot be matched or keyed;
                    // treat it as absent.
                    Some(Err(_)) | None if *omit_if_not_present => {}
                    Some(Err(_)) | None => return None,
                },
                Specifier::SourceCluster => {
                    entries.push(("source_cluster", Cow::Borrowed(SOURCE_CLUSTER)))
                }
                Specifier::DestinationCluster => {
                    entries.push(("destination_cluster", Cow::Borrowed(request.destination?)))
                }
            }
        }
        Some(entries)
    }
}
