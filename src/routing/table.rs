//! The route table: Mappings grouped into canary groups, ordered as Emissary
//! orders them (§2.3), and attached to the virtual hosts they associate with.
//!
//! Lookup walks one virtual host's groups in order; the first whose
//! predicates all hold wins. Predicates are ordered cheapest first, so a
//! non-matching group usually costs one byte comparison of the prefix.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderMap;

use crate::config::diagnostics::{Diagnostic, Location};
use crate::model::{Association, Mapping, VirtualHost};
use crate::routing::matchers::{AuthorityMatch, HostGlob, PathMatch, ValueMatch};

/// What a request offers to the matchers.
pub struct RequestView<'a> {
    /// Normalised path, without the query.
    pub path: &'a str,
    pub query: &'a str,
    /// `Host` / `:authority`, lower-cased, port kept unless stripped by the
    /// Module's `strip_matching_host_port`.
    pub authority: &'a str,
    pub method: &'a str,
    pub headers: &'a HeaderMap,
}

/// The predicates shared by every Mapping of a group.
#[derive(Debug)]
pub struct RouteMatch {
    pub(crate) path: PathMatch,
    authority: Option<AuthorityMatch>,
    method: Option<ValueMatch>,
    headers: Vec<(http::HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
}

impl RouteMatch {
    pub fn matches(&self, request: &RequestView) -> bool {
        self.path.matches(request.path)
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.matches(request.method))
            && self
                .authority
                .as_ref()
                .is_none_or(|a| a.matches(request.authority))
            && self.headers.iter().all(|(name, matcher)| {
                let mut values = request.headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => false,
                    (Some(only), None) => only.to_str().is_ok_and(|v| matcher.matches(v)),
                    // Envoy matches a repeated header against its values joined by commas.
                    (Some(_), Some(_)) => {
                        let joined: Vec<&str> = request
                            .headers
                            .get_all(name)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect();
                        matcher.matches(&joined.join(","))
                    }
                }
            })
            && self.query.iter().all(|(name, matcher)| {
                query_value(request.query, name).is_some_and(|v| matcher.matches(v))
            })
    }
}

fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// A canary group: one set of predicates, several Mappings sharing traffic.
#[derive(Debug)]
pub struct RouteGroup<R> {
    pub matcher: RouteMatch,
    /// What the group matches, in words, for the diag endpoint.
    pub summary: String,
    /// Cumulative thresholds out of 100, in order; see [`RouteGroup::pick`].
    pub members: Vec<(u32, Arc<R>)>,
}

impl<R> RouteGroup<R> {
    /// Chooses a member with one random number in 0..100, as Envoy checks
    /// its runtime fractions: the first member whose threshold is above it.
    pub fn pick(&self, roll: u32) -> &Arc<R> {
        pick(&self.members, roll)
    }

    pub fn is_canary(&self) -> bool {
        self.members.len() > 1
    }
}

/// The first member whose cumulative threshold is above `roll` (0..100).
/// A group always has a member: groups are built from at least one.
pub fn pick<R>(members: &[(u32, R)], roll: u32) -> &R {
    let last = members.len() - 1;
    let index = members
        .iter()
        .position(|(threshold, _)| roll < *threshold)
        .unwrap_or(last);
    &members[index].1
}

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

/// A byte trie of the groups' literal path prefixes: walking a path along
/// it collects every group the path could match, typically a handful out
/// of thousands. Groups without a literal prefix are candidates always.
#[derive(Debug, Default)]
struct PrefixIndex {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Default)]
struct TrieNode {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    /// Groups whose prefix ends here.
    groups: Vec<u32>,
}

impl PrefixIndex {
    fn new<'p>(prefixes: impl Iterator<Item = &'p str>) -> Self {
        let mut index = PrefixIndex {
            nodes: vec![TrieNode::default()],
        };
        for (group, prefix) in prefixes.enumerate() {
            let mut node = 0usize;
            for byte in prefix.bytes() {
                node = match index.nodes[node]
                    .children
                    .binary_search_by_key(&byte, |c| c.0)
                {
                    Ok(found) => index.nodes[node].children[found].1 as usize,
                    Err(slot) => {
                        let next = index.nodes.len();
                        index.nodes.push(TrieNode::default());
                        index.nodes[node].children.insert(slot, (byte, next as u32));
                        next
                    }
                };
            }
            index.nodes[node].groups.push(group as u32);
        }
        index
    }

    fn candidates(&self, path: &str) -> Vec<u32> {
        let mut found = self.nodes[0].groups.clone();
        let mut node = &self.nodes[0];
        for byte in path.bytes() {
            match node.children.binary_search_by_key(&byte, |c| c.0) {
                Ok(child) => node = &self.nodes[node.children[child].1 as usize],
                Err(_) => break,
            }
            found.extend_from_slice(&node.groups);
        }
        found
    }
}

/// Chooses among host globs as Envoy chooses virtual hosts: exact, then
/// the longest `*.suffix`, then the longest `prefix.*`, then `*`. The first
/// of equal globs wins.
#[derive(Debug, Default)]
pub struct HostIndex {
    exact: BTreeMap<String, usize>,
    suffixes: Vec<(String, usize)>,
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
}

impl HostIndex {
    pub fn new<'g>(globs: impl IntoIterator<Item = (usize, &'g HostGlob)>) -> Self {
        let mut index = HostIndex::default();
        for (position, glob) in globs {
            match glob {
                HostGlob::Any => {
                    index.any.get_or_insert(position);
                }
                HostGlob::Exact(name) => {
                    index.exact.entry(name.clone()).or_insert(position);
                }
                HostGlob::Suffix(s) => index.suffixes.push((s.clone(), position)),
                HostGlob::Prefix(p) => index.prefixes.push((p.clone(), position)),
            }
        }
        index
            .suffixes
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        index
            .prefixes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        index
    }

    /// `name` is a host name without port, lower-cased; `None` (a TLS
    /// client that sent no SNI) only finds `*`.
    pub fn select(&self, name: Option<&str>) -> Option<usize> {
        let Some(name) = name else { return self.any };
        self.exact
            .get(name)
            .copied()
            .or_else(|| {
                self.suffixes
                    .iter()
                    .find(|(s, _)| name.len() > s.len() && name.ends_with(s.as_str()))
                    .map(|(_, i)| *i)
            })
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| name.len() > p.len() && name.starts_with(p.as_str()))
                    .map(|(_, i)| *i)
            })
            .or(self.any)
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

/// Emissary's route sort key (§2.3), compared descending.
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
    /// The `shadow: true` Mapping that mirrors the group's requests (§2.7).
    pub shadow: Option<&'m Mapping>,
}

/// Groups and orders Mappings; inconsistent groups and newcomers are
/// reported and left out (§2.6).
pub fn group_mappings<'m>(
    mappings: &'m [Mapping],
    diags: &mut Vec<Diagnostic>,
) -> Vec<MappingGroup<'m>> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<&Mapping>> = BTreeMap::new();
    for mapping in mappings {
        let identity = group_identity(mapping);
        let members = groups.entry(identity.clone()).or_insert_with(|| {
            order.push(identity.clone());
            Vec::new()
        });
        if let Some(first) = members.first() {
            if let Some((key, _)) = mapping
                .group_invariants
                .iter()
                .zip(&first.group_invariants)
                .find(|(a, b)| a != b)
                .map(|(a, _)| a)
            {
                diags.push(
                    Diagnostic::error(
                        Location::Resource(mapping.id.clone()),
                        format!(
                            "cannot accept new mapping {} with mismatched {key}: it shares its \
                             match with {} (a canary group), which sets it differently",
                            mapping.name, first.name
                        ),
                    )
                    .field(format!("spec.{key}")),
                );
                continue;
            }
        }
        if mapping.shadow && members.iter().any(|m| m.shadow) {
            diags.push(
                Diagnostic::error(
                    Location::Resource(mapping.id.clone()),
                    format!(
                        "{} shares its match with another shadow Mapping; a group has at most \
                         one",
                        mapping.name
                    ),
                )
                .field("spec.shadow"),
            );
            continue;
        }
        if mapping.redirect.is_some() && members.iter().any(|m| m.redirect.is_some()) {
            diags.push(
                Diagnostic::error(
                    Location::Resource(mapping.id.clone()),
                    format!(
                        "{} shares its match with another host_redirect Mapping; a group has \
                         at most one",
                        mapping.name
                    ),
                )
                .field("spec.host_redirect"),
            );
            continue;
        }
        members.push(mapping);
    }

    let mut out: Vec<(SortKey, MappingGroup)> = Vec::new();
    for identity in order {
        let Some(mut members) = groups.remove(&identity) else {
            continue;
        };
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
                    .field("spec.shadow"),
                );
            }
            continue;
        }
        let members = ordered_for_split(&members);
        let Some(thresholds) = thresholds(&members, diags) else {
            continue;
        };
        let key = members
            .iter()
            .map(|m| sort_key(m))
            .max()
            .unwrap_or_else(|| sort_key(members[0]));
        out.push((
            key,
            MappingGroup {
                members,
                thresholds,
                shadow,
            },
        ));
    }
    // Stable: equal keys keep resource order.
    out.sort_by(|a, b| b.0.cmp(&a.0));
    out.into_iter().map(|(_, g)| g).collect()
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
                    .field("spec.weight"),
                );
            }
            None
        }
    }
}

/// Cumulative thresholds out of 100 for weights in [`weighted_first`]
/// order: weighted members take their weight, the rest is shared equally
/// by the unweighted ones, the last absorbing rounding. `Err` carries the
/// total when the weights add up to more than 100.
pub fn split(weights: &[Option<u32>]) -> Result<Vec<u32>, u32> {
    if weights.len() == 1 {
        return Ok(vec![100]);
    }
    let total: u32 = weights.iter().flatten().sum();
    if total > 100 {
        return Err(total);
    }
    let unweighted = weights.iter().filter(|w| w.is_none()).count() as u32;
    let remaining = 100 - total;
    let share = remaining.checked_div(unweighted).unwrap_or(0);
    let mut cumulative = 0;
    let mut out = Vec::with_capacity(weights.len());
    let mut seen_unweighted = 0;
    for (index, weight) in weights.iter().enumerate() {
        let part = match weight {
            Some(w) => *w,
            None => {
                seen_unweighted += 1;
                if seen_unweighted == unweighted {
                    remaining - share * (unweighted - 1)
                } else {
                    share
                }
            }
        };
        cumulative += part;
        // Weights below 100 with nobody left to absorb the rest: the last
        // member takes it, so every request routes.
        if index == weights.len() - 1 {
            cumulative = 100;
        }
        out.push(cumulative);
    }
    Ok(out)
}

/// Weighted members take their share first.
fn ordered_for_split<'m>(members: &[&'m Mapping]) -> Vec<&'m Mapping> {
    weighted_first(members, |m| m.weight)
}

/// The members with a weight, then those without, each in their order.
pub fn weighted_first<T: Copy>(members: &[T], weight: impl Fn(&T) -> Option<u32>) -> Vec<T> {
    let mut ordered: Vec<T> = members
        .iter()
        .copied()
        .filter(|m| weight(m).is_some())
        .collect();
    ordered.extend(members.iter().copied().filter(|m| weight(m).is_none()));
    ordered
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
    RouteMatch {
        path: m.path.clone(),
        authority: m.authority.as_ref().map(|(a, _)| a.clone()),
        method: m.method.clone(),
        headers: m.headers.clone(),
        query: m.query.clone(),
    }
}

/// Does this Host's virtual host carry this Mapping (§2.2)?
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
    fn weights_are_exact_shares_and_the_rest_is_divided() {
        assert_eq!(split(&[Some(25), Some(75)]), Ok(vec![25, 100]));
        assert_eq!(split(&[Some(10), None, None]), Ok(vec![10, 55, 100]));
        assert_eq!(split(&[None, None, None]), Ok(vec![33, 66, 100]));
        // Below 100 with nobody to absorb the rest: the last takes it.
        assert_eq!(split(&[Some(20), Some(30)]), Ok(vec![20, 100]));
        assert_eq!(split(&[Some(0), Some(100)]), Ok(vec![0, 100]));
        assert_eq!(split(&[Some(60), Some(50)]), Err(110));
        assert_eq!(split(&[Some(7)]), Ok(vec![100]));
    }

    #[test]
    fn a_roll_picks_the_first_threshold_above_it() {
        let members = [(25, "small"), (100, "large")];
        assert_eq!(*pick(&members, 0), "small");
        assert_eq!(*pick(&members, 24), "small");
        assert_eq!(*pick(&members, 25), "large");
        assert_eq!(*pick(&members, 99), "large");
        assert_eq!(*pick(&[(0, "never"), (100, "always")], 0), "always");
    }

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
