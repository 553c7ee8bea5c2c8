//! Resource YAML: Emissary's v3 kinds and the Kubernetes objects beside
//! them, as documents a test concatenates into its resource file.

use super::echo::Echo;
use super::pki::CertFiles;

pub const V3: &str = "getambassador.io/v3alpha1";

/// `text` with every non-blank line indented by `by` spaces.
pub fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{pad}{l}\n"))
        .collect()
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
pub fn q(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes as JSON")
}

/// The `ambassador` Module with `config` (block YAML under `spec.config`).
pub fn module(config: &str) -> String {
    doc(
        "Module",
        "name: ambassador",
        &format!("config:\n{}", indent(config, 2)),
    )
}

/// One v3 resource; `metadata` is the inside of a flow map, `spec` block
/// YAML at the level of the spec's keys.
pub fn doc(kind: &str, metadata: &str, spec: &str) -> String {
    versioned_doc(V3, kind, metadata, spec)
}

/// [`doc`] in another `apiVersion`, e.g. `getambassador.io/v2`.
pub fn versioned_doc(api_version: &str, kind: &str, metadata: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: {api_version}\nkind: {kind}\nmetadata: {{{metadata}}}\nspec:\n{}",
        indent(spec, 2)
    )
}

/// A Secret of `kind` (`kubernetes.io/tls`, `Opaque`) whose `stringData`
/// holds `entries` (key, text) as YAML block scalars.
fn secret_doc(name: &str, namespace: &str, kind: &str, entries: &[(&str, &str)]) -> String {
    let mut out = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {}, namespace: {namespace}}}\n\
         type: {kind}\nstringData:\n",
        q(name)
    );
    for (key, text) in entries {
        out.push_str(&format!("  {key}: |\n{}", indent(text, 4)));
    }
    out
}

/// A `kubernetes.io/tls` Secret with a certificate chain and its key.
pub fn tls_secret(name: &str, namespace: &str, cert: &CertFiles) -> String {
    secret_doc(
        name,
        namespace,
        "kubernetes.io/tls",
        &[("tls.crt", &cert.cert_pem), ("tls.key", &cert.key_pem)],
    )
}

/// An Opaque Secret with these `stringData` entries, e.g. `crl.pem`.
pub fn opaque_secret(name: &str, namespace: &str, entries: &[(&str, &str)]) -> String {
    secret_doc(name, namespace, "Opaque", entries)
}

/// An Opaque Secret holding a CA bundle under `tls.crt`, as Emissary reads it.
pub fn ca_secret(name: &str, namespace: &str, ca_pem: &str) -> String {
    opaque_secret(name, namespace, &[("tls.crt", ca_pem)])
}

/// A `kubernetes.io/tls` Secret `default/<name>` whose `stringData` holds
/// the given entries (PEM text as YAML block scalars), as one YAML document.
pub fn secret_yaml(name: &str, entries: &[(&str, &str)]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: default\n\
         type: kubernetes.io/tls\nstringData:\n"
    );
    for (key, value) in entries {
        out.push_str(&format!("  {key}: |\n"));
        for line in value.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// A Listener with securityModel XFP that binds Hosts of every namespace.
pub fn listener(name: &str, port: u16, protocol: &str) -> String {
    doc(
        "Listener",
        &format!("name: {name}"),
        &format!(
            "port: {port}\nprotocol: {protocol}\nsecurityModel: XFP\n\
             hostBinding:\n  namespace:\n    from: ALL"
        ),
    )
}

/// A Host for `hostname`; `extra` is block YAML at the level of its spec.
pub fn host(name: &str, hostname: &str, extra: &str) -> String {
    doc(
        "Host",
        &format!("name: {}", q(name)),
        &format!("hostname: {}\n{extra}", q(hostname)),
    )
}

/// `tlsSecret` plus `requestPolicy.insecure.action` (`None`: the default).
pub fn tls_spec(secret: &str, action: Option<&str>) -> String {
    let policy = action.map(insecure_action).unwrap_or_default();
    format!("tlsSecret:\n  name: {}\n{policy}", q(secret))
}

/// A Host's `requestPolicy.insecure.action` (`Redirect`, `Route`, `Reject`),
/// as lines of its spec.
pub fn insecure_action(action: &str) -> String {
    format!("requestPolicy:\n  insecure:\n    action: {action}\n")
}

/// A TLS Host `name` for `hostname` and the Secret `default/<name>-cert`
/// that holds its certificate; `extra` is block YAML at the level of the
/// Host's spec (`tls:`, `tlsContext:`, [`insecure_action`]).
pub fn tls_host(name: &str, hostname: &str, cert: &CertFiles, extra: &str) -> String {
    let secret = format!("{name}-cert");
    let spec = format!("{}{extra}", tls_spec(&secret, None));
    tls_secret(&secret, "default", cert) + &host(name, hostname, &spec)
}

/// A Kubernetes object: `metadata` is the inside of a flow map, `body`
/// block YAML at the top level (`subsets:`, `endpoints:`, `spec:`).
pub fn kube_doc(api_version: &str, kind: &str, metadata: &str, body: &str) -> String {
    format!("---\napiVersion: {api_version}\nkind: {kind}\nmetadata: {{{metadata}}}\n{body}")
}

/// A core/v1 Endpoints `default/<name>`: `ready` and `not_ready` pods on
/// their shared port.
pub fn endpoints(name: &str, ready: &[&Echo], not_ready: &[&Echo]) -> String {
    let port = ready
        .iter()
        .chain(not_ready)
        .map(|e| e.port())
        .next()
        .unwrap_or(80);
    let list = |pods: &[&Echo]| -> String {
        match pods {
            [] => " []\n".to_string(),
            _ => pods
                .iter()
                .map(|e| format!("\n  - ip: {}", e.addr().ip()))
                .chain(["\n".to_string()])
                .collect(),
        }
    };
    kube_doc(
        "v1",
        "Endpoints",
        &format!("name: {name}, namespace: default"),
        &format!(
            "subsets:\n- addresses:{}  notReadyAddresses:{}  ports:\n  - name: http\n    port: {port}\n",
            list(ready),
            list(not_ready)
        ),
    )
}

/// A discovery.k8s.io/v1 EndpointSlice `default/<name>` of Service
/// `service`; each pod with its `ready` condition.
pub fn endpoint_slice(name: &str, service: &str, pods: &[(&Echo, bool)]) -> String {
    let port = pods.first().map(|(e, _)| e.port()).unwrap_or(80);
    let endpoints: String = pods
        .iter()
        .map(|(e, ready)| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: {ready}}}\n",
                e.addr().ip()
            )
        })
        .collect();
    kube_doc(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        &format!(
            "name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}"
        ),
        &format!(
            "addressType: IPv4\nendpoints:\n{endpoints}ports:\n- name: http\n  port: {port}\n"
        ),
    )
}

/// A Mapping of `prefix` to `echo`; `metadata_extra` is appended inside the
/// metadata flow map (`, labels: {..}`), `extra` are spec lines.
pub fn mapping(name: &str, metadata_extra: &str, prefix: &str, echo: &Echo, extra: &str) -> String {
    doc(
        "Mapping",
        &format!("name: {name}{metadata_extra}"),
        &format!(
            "prefix: {}\nservice: 127.0.0.1:{}\n{extra}",
            q(prefix),
            echo.port()
        ),
    )
}

/// A TCPMapping; `extra` is block YAML at the level of its spec's keys.
pub fn tcp_mapping(name: &str, port: u16, service: &str, extra: &str) -> String {
    doc(
        "TCPMapping",
        &format!("name: {}", q(name)),
        &format!("port: {port}\nservice: {}\n{extra}", q(service)),
    )
}
