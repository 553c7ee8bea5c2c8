//! The hot paths of the gateway's own logic: route lookup in large tables,
//! header templates, and compiling a configuration of 10,000 Mappings.
//!
//! `cargo bench --bench routing`

use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pingress::config::load::parse_documents;
use pingress::model::validate;
use pingress::routing::headers::{HeaderTemplate, RequestFacts};
use pingress::routing::table::RequestView;
use pingress::snapshot::{compile, Inherited, Resolution, Snapshot};

/// `n` Mappings of the shapes real configurations have: plain prefixes,
/// host globs, header matches and some regexes, under a few hundred
/// services. The benchmarked request matches the last route in Emissary's
/// order (the shortest prefix), so a linear scan would see them all.
fn resources(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let extra = match i % 10 {
            0 => format!("  hostname: \"*.tenant{}.example.com\"\n", i % 97),
            1 => "  headers:\n    x-canary: \"yes\"\n".to_string(),
            2 => format!("  prefix_regex: true\n  prefix: \"/re/{i}/[0-9]+\"\n"),
            _ => String::new(),
        };
        let prefix = if extra.contains("prefix:") {
            String::new()
        } else {
            format!("  prefix: /api/v{}/svc{i}/\n", i % 7)
        };
        let hostname = if extra.contains("hostname") {
            ""
        } else {
            "  hostname: \"*\"\n"
        };
        out.push_str(&format!(
            "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: m{i}\n\
             spec:\n{hostname}{prefix}{extra}  service: svc{}:8080\n",
            i % 300
        ));
    }
    out.push_str(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: fallback\n\
         spec:\n  hostname: \"*\"\n  prefix: /\n  service: fallback:8080\n",
    );
    out
}

fn snapshot(n: usize) -> Snapshot {
    let mut raw = Vec::new();
    let mut diags = Vec::new();
    parse_documents(Path::new("bench.yaml"), &resources(n), &mut raw, &mut diags);
    assert!(diags.is_empty(), "{diags:?}");
    let (model, problems) = validate(&raw, "default", &pingress::filters::Registry::default());
    assert!(problems.iter().all(|d| !d.is_error()), "{problems:?}");
    compile(&model, Resolution::Skip, &Inherited::default()).0
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    for n in [10, 1_000, 10_000] {
        let snapshot = snapshot(n);
        let (_, host) = snapshot.listeners[0]
            .hosts
            .select("gateway.example.com")
            .expect("the default Host");
        let headers = http::HeaderMap::new();
        let view = RequestView {
            path: "/static/app.js",
            query: "",
            authority: "gateway.example.com",
            method: "GET",
            headers: &headers,
        };
        assert!(host.find(&view).is_some());
        group.bench_with_input(BenchmarkId::from_parameter(n), &view, |b, view| {
            b.iter(|| host.find(view).map(|g| g.members.len()))
        });
    }
    group.finish();
}

fn templates(c: &mut Criterion) {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-user", http::HeaderValue::from_static("alice"));
    let facts = RequestFacts {
        client_addr: Some("10.1.2.3:4567".parse().expect("address")),
        local_addr: Some("127.0.0.1:8080".parse().expect("address")),
        protocol: "HTTP/1.1",
        request_headers: &headers,
        peer: None,
        sni: None,
    };
    let fixed = HeaderTemplate::parse("pingress").expect("template");
    let rendered =
        HeaderTemplate::parse("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% via %REQ(x-user)%")
            .expect("template");
    c.bench_function("header_template/fixed", |b| b.iter(|| fixed.render(&facts)));
    c.bench_function("header_template/variables", |b| {
        b.iter(|| rendered.render(&facts))
    });
}

fn compile_10k(c: &mut Criterion) {
    let text = resources(10_000);
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("10000_mappings", |b| {
        b.iter(|| {
            let mut raw = Vec::new();
            let mut diags = Vec::new();
            parse_documents(Path::new("bench.yaml"), &text, &mut raw, &mut diags);
            let (model, _) = validate(&raw, "default", &pingress::filters::Registry::default());
            compile(&model, Resolution::Skip, &Inherited::default())
                .0
                .listeners
                .len()
        })
    });
    group.finish();
}

criterion_group!(benches, lookup, templates, compile_10k);
criterion_main!(benches);
