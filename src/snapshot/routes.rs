//! Emissary's route table, built from the model: Mappings grouped into
//! canary groups, ordered as Emissary orders them, and attached to the
//! virtual hosts they associate with. See Emissary's "Mapping" reference
//! (route precedence and ordering, canary releases) and "Host"
//! (associating Mappings with Hosts).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::diagnostics::{Code, Diagnostic, Location};
use crate::model::{Association, Mapping, VirtualHost};
use crate::routing::matchers::{AuthorityMatch, PathMatch};
use crate::routing::table::{
    split, weighted_first, HostIndex, PrefixIndex, RequestView, RouteGroup, RouteMatch,
};

/// One virtual host with its routes in evaluation order.
#[derive(Debug)]
pub struct HostRoutes<R> {
    pub host: VirtualHost,
    pub groups: Vec<Arc<RouteGroup<R>>>,
    index: PrefixIndex,
}

impl<R> HostRoutes<R> {
    pub fn new(host: VirtualHost, groups: Vec<Arc<RouteGroup<R>>>) -> Self {
        let index = PrefixIndex::new(groups.iter().map(|g| g.matcher.path.literal_prefix()));
        HostRoutes {
            host,
            groups,
            index,
        }
    }

    /// The first group in evaluation order whose predicates all hold. Only
    /// groups whose literal path prefix the path starts with are tested.
    pub fn find(&self, request: &RequestView) -> Option<&RouteGroup<R>> {
        let mut candidates = self.index.candidates(request.path);
        candidates.sort_unstable();
        candidates
            .into_iter()
            .map(|i| self.groups[i as usize].as_ref())
            .find(|group| group.matcher.matches(request))
    }
}

/// Virtual hosts of one listener: by request host name for routing, and by
/// SNI among the TLS Hosts for certificates.
#[derive(Debug)]
pub struct HostTable<R> {
    hosts: Vec<HostRoutes<R>>,
    by_name: HostIndex,
    by_sni: HostIndex,
}

impl<R> HostTable<R> {
    pub fn new(hosts: Vec<HostRoutes<R>>) -> Self {
        let by_name = HostIndex::new(hosts.iter().enumerate().map(|(i, h)| (i, &h.host.hostname)));
        let by_sni = HostIndex::new(
            hosts
                .iter()
                .enumerate()
                // An invalid Host that meant TLS keeps its SNI place, with
                // no certificate: its handshakes fail.
                .filter(|(_, h)| {
                    h.host.tls.is_some() || h.host.invalid.is_some_and(|i| i.meant_tls)
                })
                .map(|(i, h)| (i, &h.host.hostname)),
        );
        HostTable {
            hosts,
            by_name,
            by_sni,
        }
    }

    /// The Host for a request host name (without port, lower-cased).
    pub fn select(&self, name: &str) -> Option<(usize, &HostRoutes<R>)> {
        let index = self.by_name.select(Some(name))?;
        Some((index, self.hosts.get(index)?))
    }

    /// The TLS Host for a ClientHello's SNI.
    pub fn select_tls(&self, sni: Option<&str>) -> Option<(usize, &HostRoutes<R>)> {
        let index = self.by_sni.select(sni)?;
        Some((index, self.hosts.get(index)?))
    }

    pub fn get(&self, index: usize) -> Option<&HostRoutes<R>> {
        self.hosts.get(index)
    }

    pub fn hosts(&self) -> &[HostRoutes<R>] {
        &self.hosts
    }
}

/// Emissary's route order, compared descending: `precedence` first, then
/// the longer prefix, then more header and query matchers, then the texts
/// themselves, so the order never depends on the order of the files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SortKey {
    precedence: i64,
    prefix_len: usize,
    header_len: usize,
    query_len: usize,
    prefix: String,
    method: String,
    headers: Vec<String>,
    query: Vec<String>,
}

impl Ord for SortKey {
    fn cmp(&self, other: &Self) -> Ordering {
        (
            self.precedence,
            self.prefix_len,
            self.header_len,
            self.query_len,
            &self.prefix,
            &self.method,
            &self.headers,
            &self.query,
        )
            .cmp(&(
                other.precedence,
                other.prefix_len,
                other.header_len,
                other.query_len,
                &other.prefix,
                &other.method,
                &other.headers,
                &other.query,
            ))
    }
}

impl PartialOrd for SortKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Header matchers as Envoy sees them: the Mapping's own, plus `:authority`
/// from hostname/host and `:method` from method.
fn envoy_headers(m: &Mapping) -> Vec<(String, String, bool)> {
    let mut out: Vec<(String, String, bool)> = m
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.text().to_string(), v.is_regex()))
        .collect();
    if let Some((matcher, text)) = &m.authority {
        out.push((
            ":authority".into(),
            text.clone(),
            matches!(matcher, AuthorityMatch::Regex(_)),
        ));
    }
    if let Some(method) = &m.method {
        out.push((
            ":method".into(),
            method.text().to_string(),
            method.is_regex(),
        ));
    }
    out
}

fn matcher_len(items: &[(String, String, bool)]) -> usize {
    items
        .iter()
        .map(|(name, value, regex)| name.len() + value.len() + usize::from(*regex))
        .sum()
}

fn sort_key(m: &Mapping) -> SortKey {
    let headers = envoy_headers(m);
    let query: Vec<(String, String, bool)> = m
        .query
        .iter()
        .map(|(n, v)| (n.clone(), v.text().to_string(), v.is_regex()))
        .collect();
    let strings = |items: &[(String, String, bool)]| {
        let mut s: Vec<String> = items.iter().map(|(n, v, _)| format!("{n}-{v}")).collect();
        s.sort();
        s
    };
    SortKey {
        precedence: m.precedence,
        prefix_len: m.prefix.chars().count(),
        header_len: matcher_len(&headers),
        query_len: matcher_len(&query),
        prefix: m.prefix.clone(),
        method: m
            .method
            .as_ref()
            .map(|v| v.text().to_string())
            .unwrap_or_else(|| "GET".into()),
        headers: strings(&headers),
        query: strings(&query),
    }
}

/// What makes Mappings one canary group.
fn group_identity(m: &Mapping) -> String {
    let key = sort_key(m);
    let selector_labels = match m.association {
        Association::SelectorOnly => format!("{:?}", m.labels),
        _ => String::new(),
    };
    format!(
        "{}|{}|{:?}|{:?}|{:?}|{selector_labels}",
        key.precedence,
        key.prefix,
        m.method.as_ref().map(|v| v.text()),
        key.headers,
        key.query
    )
}

/// A group of Mappings before their routes are built.
pub struct MappingGroup<'m> {
    pub members: Vec<&'m Mapping>,
    /// Cumulative thresholds, parallel to `members`.
    pub thresholds: Vec<u32>,
    /// The `shadow: true` Mapping that mirrors the group's requests.
    pub shadow: Option<&'m Mapping>,
}

/// Groups and orders Mappings. Mappings with the same match form one
/// canary group; a newcomer that disagrees with its group on a setting the
/// group shares (Emissary's "cannot accept new mapping ... with mismatched
/// ...") is reported and left out.
pub fn group_mappings<'m>(
    mappings: &'m [Mapping],
    diags: &mut Vec<Diagnostic>,
) -> Vec<MappingGroup<'m>> {
    let mut out: Vec<(SortKey, MappingGroup)> = same_match(mappings, diags)
        .into_iter()
        .filter_map(|members| canary_group(members, diags))
        .collect();
    // Stable: equal keys keep resource order.
    out.sort_by(|a, b| b.0.cmp(&a.0));
    out.into_iter().map(|(_, g)| g).collect()
}

/// The Mappings that share a match, each set in the order its first
/// member comes, without the newcomers their group refuses.
fn same_match<'m>(mappings: &'m [Mapping], diags: &mut Vec<Diagnostic>) -> Vec<Vec<&'m Mapping>> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<&Mapping>> = BTreeMap::new();
    for mapping in mappings {
        let identity = group_identity(mapping);
        let members = groups.entry(identity.clone()).or_insert_with(|| {
            order.push(identity.clone());
            Vec::new()
        });
        match refusal(mapping, members) {
            Some(diagnostic) => diags.push(diagnostic),
            None => members.push(mapping),
        }
    }
    order
        .iter()
        .filter_map(|identity| groups.remove(identity))
        .collect()
}

/// Why a group refuses `mapping`: it sets a shared key differently from
/// the group's first member, or it would be the group's second shadow or
/// second `host_redirect`.
fn refusal(mapping: &Mapping, members: &[&Mapping]) -> Option<Diagnostic> {
    if let Some(first) = members.first() {
        if let Some((key, _)) = mapping
            .group_invariants
            .iter()
            .zip(&first.group_invariants)
            .find(|(a, b)| a != b)
            .map(|(a, _)| a)
        {
            return Some(
                Diagnostic::error(
                    Location::Resource(mapping.id.clone()),
                    format!(
                        "cannot accept new mapping {} with mismatched {key}: it shares its \
                         match with {} (a canary group), which sets it differently",
                        mapping.name, first.name
                    ),
                )
                .code(Code::Conflict)
                .field(format!("spec.{key}")),
            );
        }
    }
    if mapping.shadow && members.iter().any(|m| m.shadow) {
        return Some(
            Diagnostic::error(
                Location::Resource(mapping.id.clone()),
                format!(
                    "{} shares its match with another shadow Mapping; a group has at most \
                     one",
                    mapping.name
                ),
            )
            .code(Code::Conflict)
            .field("spec.shadow"),
        );
    }
    if mapping.redirect.is_some() && members.iter().any(|m| m.redirect.is_some()) {
        return Some(
            Diagnostic::error(
                Location::Resource(mapping.id.clone()),
                format!(
                    "{} shares its match with another host_redirect Mapping; a group has \
                     at most one",
                    mapping.name
                ),
            )
            .code(Code::Conflict)
            .field("spec.host_redirect"),
        );
    }
    None
}

/// The canary group of Mappings that share a match, with the key it is
/// ordered by: its shadow set apart, its members' shares of the split.
/// `None` when nothing is left to route or the weights do not fit.
fn canary_group<'m>(
    mut members: Vec<&'m Mapping>,
    diags: &mut Vec<Diagnostic>,
) -> Option<(SortKey, MappingGroup<'m>)> {
    // A shadow takes no share of the split: its weight is the share
    // of requests it mirrors.
    let shadow = members
        .iter()
        .position(|m| m.shadow)
        .map(|index| members.remove(index));
    if members.is_empty() {
        if let Some(shadow) = shadow {
            diags.push(
                Diagnostic::warning(
                    Location::Resource(shadow.id.clone()),
                    format!(
                        "shadow Mapping {} has no Mapping with its match to mirror; it \
                         routes nothing",
                        shadow.name
                    ),
                )
                .code(Code::Unreachable)
                .field("spec.shadow"),
            );
        }
        return None;
    }
    let members = ordered_for_split(&members);
    let thresholds = thresholds(&members, diags)?;
    let key = members
        .iter()
        .map(|m| sort_key(m))
        .max()
        .unwrap_or_else(|| sort_key(members[0]));
    Some((
        key,
        MappingGroup {
            members,
            thresholds,
            shadow,
        },
    ))
}

/// Splits 100% among a group ordered by [`weighted_first`], or reports the
/// group when its weights add up to more than 100.
fn thresholds(members: &[&Mapping], diags: &mut Vec<Diagnostic>) -> Option<Vec<u32>> {
    let weights: Vec<Option<u32>> = members.iter().map(|m| m.weight).collect();
    match split(&weights) {
        Ok(thresholds) => Some(thresholds),
        Err(total) => {
            for m in members {
                diags.push(
                    Diagnostic::error(
                        Location::Resource(m.id.clone()),
                        format!(
                            "the weights of the canary group of {} add up to {total}, above 100; \
                             the whole group is dropped",
                            m.prefix
                        ),
                    )
                    .code(Code::Conflict)
                    .field("spec.weight"),
                );
            }
            None
        }
    }
}

/// Weighted members take their share first.
fn ordered_for_split<'m>(members: &[&'m Mapping]) -> Vec<&'m Mapping> {
    weighted_first(members, |m| m.weight)
}

/// A one-line description of what a Mapping matches, for the admin diag.
/// Header and query values are not shown: they may be credentials (an API
/// key that routes); the host and method are.
pub fn describe(m: &Mapping) -> String {
    let path = match &m.path {
        PathMatch::Prefix {
            case_sensitive: true,
            ..
        } => format!("prefix {}", m.prefix),
        PathMatch::Prefix { .. } => format!("prefix {} (any case)", m.prefix),
        PathMatch::Exact { .. } => format!("path {}", m.prefix),
        PathMatch::Regex(_) => format!("regex {}", m.prefix),
    };
    let mut parts = vec![path];
    for (name, value, regex) in envoy_headers(m) {
        let value = if name.starts_with(':') { &value } else { "***" };
        parts.push(format!("{name}{}{value}", if regex { " ~ " } else { ": " }));
    }
    for (name, value) in &m.query {
        parts.push(format!(
            "?{name}{}***",
            if value.is_regex() { " ~ " } else { "=" }
        ));
    }
    if m.precedence != 0 {
        parts.push(format!("precedence {}", m.precedence));
    }
    parts.join(", ")
}

/// Builds the predicates of a group from its first member.
pub fn route_match(m: &Mapping) -> RouteMatch {
    RouteMatch::new(
        m.path.clone(),
        m.authority.as_ref().map(|(a, _)| a.clone()),
        m.method.clone(),
        m.headers.clone(),
        m.query.clone(),
    )
}

/// Does this Host's virtual host carry this Mapping? A Mapping with a
/// hostname goes to the Hosts whose names it is compatible with, narrowed
/// by the Host's `mappingSelector` labels when it has one; a Mapping with
/// only labels, to the Hosts whose selector they satisfy.
pub fn associates(host: &VirtualHost, m: &Mapping) -> bool {
    use Association::*;
    let labels_match = |selector: &BTreeMap<String, String>| {
        selector.iter().all(|(k, v)| m.labels.get(k) == Some(v))
    };
    match (&host.selector, &m.association) {
        (_, Everywhere) => true,
        (Some(selector), Hostname(glob)) => {
            labels_match(selector) && glob.compatible(&host.hostname)
        }
        (Some(selector), SelectorOnly) => labels_match(selector),
        (None, Hostname(glob)) => glob.compatible(&host.hostname),
        (None, SelectorOnly) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_leave_header_and_query_values_out() {
        let text = "apiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata: {name: m}\n\
                    spec:\n  hostname: \"*\"\n  prefix: /api/\n  service: s\n  method: POST\n  \
                    headers: {x-api-key: s3cret}\n  regex_headers: {authorization: \"Bearer s3cret.*\"}\n  \
                    query_parameters: {token: s3cret}\n";
        let (mut raw, mut diags) = (Vec::new(), Vec::new());
        crate::config::load::parse_documents(
            std::path::Path::new("t.yaml"),
            text,
            &mut raw,
            &mut diags,
        );
        let (model, problems) =
            crate::model::validate(&raw, "default", &crate::filters::Registry::default());
        assert!(problems.iter().all(|d| !d.is_error()), "{problems:?}");
        let shown = describe(&model.mappings[0]);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("x-api-key: ***")
                && shown.contains("authorization ~ ***")
                && shown.contains("?token=***")
                && shown.contains(":method: POST"),
            "{shown}"
        );
    }
}
