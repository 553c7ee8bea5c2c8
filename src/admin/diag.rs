//! `/ambassador/v0/diag/`: what the gateway serves and what is wrong with
//! it, keyed as Emissary keys diagnostics (`name.namespace.N`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::config::diagnostics::{Diagnostic, Location};
use crate::reload::{Live, Outcome};
use crate::snapshot::Target;

fn key(diagnostic: &Diagnostic) -> String {
    match &diagnostic.location {
        Location::Resource(resource) => resource.emissary_key(),
        Location::Document(source) => source.to_string(),
        Location::File(path) => path.display().to_string(),
    }
}

/// The message without its location, which the key carries.
fn message(diagnostic: &Diagnostic) -> String {
    let mut text = match &diagnostic.field {
        Some(field) => format!("{field}: {}", diagnostic.message),
        None => diagnostic.message.clone(),
    };
    if let Some(hint) = &diagnostic.hint {
        text.push_str(&format!(" (hint: {hint})"));
    }
    text
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Errors of the serving configuration (those of resources that keep
/// their last good version included), then a reload that failed: all are
/// the operator's to fix.
fn errors(live: &Live) -> Vec<(String, String)> {
    let status = live.status.load();
    let mut out: Vec<(String, String)> = status
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| (key(d), message(d)))
        .collect();
    if let Some(reload) = &status.last_reload {
        match &reload.outcome {
            Outcome::Failed(problem) => {
                out.push(("gateway".into(), format!("reload failed: {problem}")))
            }
            Outcome::Applied => {}
        }
    }
    out
}

/// `?json=true&filter=errors`: Emissary's list of `[key, message]` pairs.
fn errors_json(live: &Live) -> Value {
    Value::Array(
        errors(live)
            .into_iter()
            .map(|(k, m)| json!([k, m]))
            .collect(),
    )
}

/// A diagnostic by its stable identity (resource, field, code) and the
/// resources it blames (`causes`), for tools that must not parse messages;
/// Emissary's `errors` and `warnings` keep their shape beside it.
fn problem_json(diagnostic: &Diagnostic) -> Value {
    let resource = match &diagnostic.location {
        Location::Resource(resource) => json!({
            "kind": resource.kind,
            "namespace": resource.namespace,
            "name": resource.name,
        }),
        _ => Value::Null,
    };
    let causes: Vec<Value> = diagnostic
        .causes
        .iter()
        .map(|cause| json!({"kind": cause.kind, "namespace": cause.namespace, "name": cause.name}))
        .collect();
    json!({
        "severity": if diagnostic.is_error() { "error" } else { "warning" },
        "code": diagnostic.code.as_str(),
        "key": key(diagnostic),
        "resource": resource,
        "field": diagnostic.field,
        "causes": causes,
        "message": diagnostic.message,
        "hint": diagnostic.hint,
    })
}

fn full_json(live: &Live) -> Value {
    let status = live.status.load();
    let snapshot = live.snapshot.load();
    let mut by_key: Map<String, Value> = Map::new();
    for (key, message) in errors(live) {
        if let Value::Array(list) = by_key.entry(key).or_insert_with(|| json!([])) {
            list.push(Value::String(message));
        }
    }
    let warnings: Vec<Value> = status
        .diagnostics
        .iter()
        .filter(|d| !d.is_error())
        .map(|d| json!([key(d), message(d)]))
        .collect();
    let mut routes = Vec::new();
    for listener in &snapshot.listeners {
        for host in listener.hosts.hosts() {
            for group in &host.groups {
                let mut previous = 0;
                let mappings: Vec<Value> = group
                    .members
                    .iter()
                    .map(|(threshold, route)| {
                        let share = threshold - previous;
                        previous = *threshold;
                        let target = match &route.target {
                            Target::Upstream(cluster) => json!({"upstream": cluster.name, "endpoints": cluster.endpoint_count(), "healthy": cluster.healthy_count()}),
                            Target::Redirect(redirect) => json!({"redirect": redirect.authority, "status": redirect.status}),
                        };
                        json!({"mapping": route.mapping, "weight": share, "target": target})
                    })
                    .collect();
                routes.push(json!({
                    "listener": listener.listener.port,
                    "host": format!("{}/{}", host.host.namespace, host.host.name),
                    "hostname": host.host.hostname.text(),
                    "match": group.summary,
                    "mappings": mappings,
                }));
            }
        }
    }
    let mut tcp = Vec::new();
    for port in &snapshot.tcp {
        for group in &port.groups {
            let mut previous = 0;
            let mappings: Vec<Value> = group
                .members
                .iter()
                .map(|(threshold, route)| {
                    let share = threshold - previous;
                    previous = *threshold;
                    json!({
                        "tcp_mapping": route.mapping,
                        "weight": share,
                        "upstream": route.cluster.name,
                        "endpoints": route.cluster.endpoint_count(),
                    })
                })
                .collect();
            tcp.push(json!({
                "port": port.port,
                "address": port.address.map(|a| a.to_string()),
                "sni": group.sni,
                "mappings": mappings,
            }));
        }
    }
    let last_reload = status.last_reload.as_ref().map(|reload| {
        let outcome = match reload.outcome {
            Outcome::Applied => "applied",
            Outcome::Failed(_) => "failed",
        };
        json!({"at": seconds(reload.at), "outcome": outcome})
    });
    json!({
        "generation": status.generation,
        "applied_at": seconds(status.applied_at),
        "last_reload": last_reload,
        "errors": by_key,
        "warnings": warnings,
        "problems": status.diagnostics.iter().map(problem_json).collect::<Vec<_>>(),
        "routes": routes,
        "tcp": tcp,
    })
}

/// The human form of `full`: one line per problem, then the route table.
fn text(live: &Live, full: &Value) -> String {
    let status = live.status.load();
    let mut out = format!("pingress configuration generation {}\n", status.generation);
    for diagnostic in &status.diagnostics {
        out.push_str(&format!("{diagnostic}\n"));
    }
    for (key, message) in errors(live)
        .into_iter()
        .skip(status.diagnostics.iter().filter(|d| d.is_error()).count())
    {
        out.push_str(&format!("{key}: {message}\n"));
    }
    out.push_str("\nroutes, in evaluation order:\n");
    if let Value::Array(routes) = &full["routes"] {
        for route in routes {
            out.push_str(&format!(
                "  :{} {} [{}] -> {}\n",
                route["listener"],
                route["hostname"].as_str().unwrap_or(""),
                route["match"].as_str().unwrap_or(""),
                route["mappings"]
            ));
        }
    }
    if let Value::Array(ports) = &full["tcp"] {
        if !ports.is_empty() {
            out.push_str("\nTCPMappings:\n");
        }
        for port in ports {
            out.push_str(&format!(
                "  :{} sni={} -> {}\n",
                port["port"],
                port["sni"].as_str().unwrap_or("-"),
                port["mappings"]
            ));
        }
    }
    out
}

/// The three forms of the diag, each rendered at most once per
/// configuration generation and second: a client looping on the diag costs
/// a copy, not a walk of the whole route table (the endpoint counts in it
/// are at most a second old).
#[derive(Default)]
pub struct DiagCache {
    at: Option<(u64, Option<SystemTime>, u64)>,
    /// The route table's walk, which the text and JSON forms share.
    full: Option<Value>,
    rendered: [Option<Arc<String>>; 3],
}

/// Which form of the diag.
#[derive(Debug, Clone, Copy)]
pub enum Form {
    Text = 0,
    Json = 1,
    ErrorsJson = 2,
}

impl DiagCache {
    pub fn get(&mut self, live: &Live, form: Form) -> Arc<String> {
        let status = live.status.load();
        let at = (
            status.generation,
            status.last_reload.as_ref().map(|r| r.at),
            seconds(SystemTime::now()),
        );
        drop(status);
        if self.at != Some(at) {
            self.at = Some(at);
            self.full = None;
            self.rendered = Default::default();
        }
        if let Some(rendered) = &self.rendered[form as usize] {
            return rendered.clone();
        }
        let rendered = Arc::new(match form {
            Form::ErrorsJson => format!("{:#}\n", errors_json(live)),
            Form::Text | Form::Json => {
                let full = self.full.get_or_insert_with(|| full_json(live));
                match form {
                    Form::Text => text(live, full),
                    _ => format!("{full:#}\n"),
                }
            }
        });
        self.rendered[form as usize] = Some(rendered.clone());
        rendered
    }
}
