//! The blocks of a route table: a group's predicates (`RouteMatch`) and
//! canary members (`RouteGroup`), the prefix trie that narrows a lookup to
//! the groups a path could match, host-name selection (`HostIndex`), and
//! canary thresholds. How Emissary groups, orders and attaches Mappings is
//! the snapshot's (`snapshot::routes`).
//!
//! Lookup walks one virtual host's groups in order; the first whose
//! predicates all hold wins. Predicates are ordered cheapest first, so a
//! non-matching group usually costs one byte comparison of the prefix.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderMap;

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
    pub fn new(
        path: PathMatch,
        authority: Option<AuthorityMatch>,
        method: Option<ValueMatch>,
        headers: Vec<(http::HeaderName, ValueMatch)>,
        query: Vec<(String, ValueMatch)>,
    ) -> RouteMatch {
        RouteMatch {
            path,
            authority,
            method,
            headers,
            query,
        }
    }

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

/// A byte trie of the groups' literal path prefixes: walking a path along
/// it collects every group the path could match, typically a handful out
/// of thousands. Groups without a literal prefix are candidates always.
#[derive(Debug, Default)]
pub struct PrefixIndex {
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
    pub fn new<'p>(prefixes: impl Iterator<Item = &'p str>) -> Self {
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

    pub fn candidates(&self, path: &str) -> Vec<u32> {
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
}
