//! Prometheus metrics, served in text format on the admin listener at
//! `/metrics`. A Mapping's series are created on its first request, so
//! ten thousand idle Mappings cost nothing to scrape; after that a request
//! only increments atomics: no label lookup, no lock.
//!
//! Certificate material never appears here; only expiry times, by context.

use std::sync::OnceLock;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Request latency buckets, in seconds: a gateway cares from a fraction of
/// a millisecond to the default 3 s route timeout and beyond.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    http: HttpMetrics,
    pub upstream: UpstreamMetrics,
    pub config: ConfigMetrics,
    tcp: TcpMetrics,
    pub downstream: DownstreamMetrics,
    rate_limit_overflow: IntCounterVec,
}

/// HTTP requests: routed to Mappings, or answered by the gateway itself.
struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    local_replies: IntCounterVec,
    upstream_errors: IntCounterVec,
    retries: IntCounterVec,
    shadows: IntCounterVec,
}

/// Connections to upstreams.
pub struct UpstreamMetrics {
    pub connections_new: IntCounter,
    pub connections_reused: IntCounter,
    pub tls_handshakes: IntCounter,
}

/// The serving configuration: reloads, certificates, resource errors.
pub struct ConfigMetrics {
    reloads: IntCounterVec,
    pub last_reload_success: Gauge,
    pub generation: Gauge,
    certificate_expiry: GaugeVec,
    resource_errors: IntGaugeVec,
}

/// TCPMappings' tunnels.
struct TcpMetrics {
    connections: IntCounterVec,
    active: IntGaugeVec,
    bytes: IntCounterVec,
    refused: IntCounterVec,
}

/// Client connections.
pub struct DownstreamMetrics {
    pub connections: IntGauge,
    refused: IntCounterVec,
    closed: IntCounterVec,
}

/// The process's metrics. Registration of fixed names cannot fail; should
/// it, the process has a bug worth stopping for at startup.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().expect("metric names and labels are valid"))
}

/// Makes metrics and registers each as it is made.
struct Registrar(Registry);

impl Registrar {
    fn add<M: Collector + Clone + 'static>(
        &self,
        metric: prometheus::Result<M>,
    ) -> prometheus::Result<M> {
        let metric = metric?;
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.add(IntCounter::new(name, help))
    }

    fn gauge(&self, name: &str, help: &str) -> prometheus::Result<Gauge> {
        self.add(Gauge::new(name, help))
    }

    fn int_gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntGaugeVec> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }
}

impl HttpMetrics {
    fn new(r: &Registrar) -> prometheus::Result<Self> {
        Ok(HttpMetrics {
            requests: r.counter_vec(
                "requests_total",
                "Requests routed to a Mapping, by status class",
                &["mapping", "class"],
            )?,
            duration: r.add(HistogramVec::new(
                HistogramOpts::new(
                    "request_duration_seconds",
                    "Time from request to the end of the response, per Mapping",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["mapping"],
            ))?,
            local_replies: r.counter_vec(
                "local_replies_total",
                "Requests the gateway answered itself (404, 301, 421, ...)",
                &["reason"],
            )?,
            upstream_errors: r.counter_vec(
                "upstream_errors_total",
                "Failed upstream exchanges, by Mapping and kind",
                &["mapping", "kind"],
            )?,
            retries: r.counter_vec(
                "upstream_retries_total",
                "Upstream tries repeated under a Mapping's retry_policy",
                &["mapping"],
            )?,
            shadows: r.counter_vec(
                "shadow_requests_total",
                "Copies of requests for shadow Mappings: sent, failed, timeout, skipped \
                 (too many in flight) or not_copied (body too large)",
                &["mapping", "outcome"],
            )?,
        })
    }
}

impl UpstreamMetrics {
    fn new(r: &Registrar) -> prometheus::Result<Self> {
        Ok(UpstreamMetrics {
            connections_new: r.counter(
                "upstream_connections_new_total",
                "Upstream connections opened",
            )?,
            connections_reused: r.counter(
                "upstream_connections_reused_total",
                "Requests sent on a pooled upstream connection",
            )?,
            tls_handshakes: r.counter(
                "upstream_tls_handshakes_total",
                "TLS handshakes with upstreams",
            )?,
        })
    }
}

impl ConfigMetrics {
    fn new(r: &Registrar) -> prometheus::Result<Self> {
        Ok(ConfigMetrics {
            reloads: r.counter_vec(
                "reloads_total",
                "Configuration reloads, by outcome",
                &["outcome"],
            )?,
            last_reload_success: r.gauge(
                "last_reload_success_timestamp_seconds",
                "When the serving configuration was applied (Unix time)",
            )?,
            generation: r.gauge(
                "config_generation",
                "Generation of the serving configuration",
            )?,
            certificate_expiry: r.add(GaugeVec::new(
                Opts::new(
                    "certificate_expiry_timestamp_seconds",
                    "When a certificate in use expires (Unix time), by TLSContext and role",
                ),
                &["context", "role"],
            ))?,
            resource_errors: r.int_gauge_vec(
                "resource_errors",
                "Resources of the serving configuration with errors, by kind (a resource an \
                 edit broke keeps serving its last good version)",
                &["kind"],
            )?,
        })
    }
}

impl TcpMetrics {
    fn new(r: &Registrar) -> prometheus::Result<Self> {
        Ok(TcpMetrics {
            connections: r.counter_vec(
                "tcp_connections_total",
                "TCP connections routed to a TCPMapping",
                &["tcp_mapping"],
            )?,
            active: r.int_gauge_vec(
                "tcp_connections_active",
                "Open TCP tunnels, per TCPMapping",
                &["tcp_mapping"],
            )?,
            bytes: r.counter_vec(
                "tcp_bytes_total",
                "Bytes through TCP tunnels, per TCPMapping; received from clients, sent to them",
                &["tcp_mapping", "direction"],
            )?,
            refused: r.counter_vec(
                "tcp_connections_refused_total",
                "TCP connections closed without a tunnel, by reason",
                &["reason"],
            )?,
        })
    }
}

impl DownstreamMetrics {
    fn new(r: &Registrar) -> prometheus::Result<Self> {
        Ok(DownstreamMetrics {
            connections: r.add(IntGauge::new(
                "downstream_connections",
                "Open client connections, HTTP and TCP, counted from the end of the TLS handshake",
            ))?,
            refused: r.counter_vec(
                "downstream_connections_refused_total",
                "Client connections closed at once, by the cap they met: max_connections or \
                 max_connections_per_client",
                &["cap"],
            )?,
            closed: r.counter_vec(
                "downstream_connections_closed_total",
                "Client connections the gateway closed by itself: handshake_timeout, \
                 handshake_failed, idle_timeout, head_timeout (408), head_too_large (431), \
                 client_policy and host_gone (a reload refused its TLS), max_connection_age",
                &["reason"],
            )?,
        })
    }
}

impl Metrics {
    fn new() -> prometheus::Result<Metrics> {
        let r = Registrar(Registry::new_custom(Some("pingress".into()), None)?);
        Ok(Metrics {
            http: HttpMetrics::new(&r)?,
            upstream: UpstreamMetrics::new(&r)?,
            config: ConfigMetrics::new(&r)?,
            tcp: TcpMetrics::new(&r)?,
            downstream: DownstreamMetrics::new(&r)?,
            rate_limit_overflow: r.counter_vec(
                "rate_limit_overflow_total",
                "Requests counted against a limit's shared overflow bucket because all its \
                 in-memory buckets were in use, by limit name",
                &["limit"],
            )?,
            registry: r.0,
        })
    }

    /// The handles of one Mapping, for its Route.
    pub fn route(&self, mapping: &str) -> RouteMetrics {
        RouteMetrics {
            mapping: mapping.into(),
            by_class: Default::default(),
            duration: OnceLock::new(),
            retries: OnceLock::new(),
        }
    }

    pub fn local_reply(&self, reason: &str) {
        self.http.local_replies.with_label_values(&[reason]).inc();
    }

    pub fn upstream_error(&self, mapping: &str, kind: &str) {
        self.http
            .upstream_errors
            .with_label_values(&[mapping, kind])
            .inc();
    }

    pub fn shadow(&self, mapping: &str, outcome: &str) {
        self.http
            .shadows
            .with_label_values(&[mapping, outcome])
            .inc();
    }

    /// The handles of one TCPMapping, for its route.
    pub fn tunnel(&self, tcp_mapping: &str) -> TunnelMetrics {
        TunnelMetrics {
            tcp_mapping: tcp_mapping.into(),
            accepted: OnceLock::new(),
            active: OnceLock::new(),
            received: OnceLock::new(),
            sent: OnceLock::new(),
        }
    }

    pub fn downstream_refused(&self, cap: &str) {
        self.downstream.refused.with_label_values(&[cap]).inc();
    }

    pub fn downstream_closed(&self, reason: &str) {
        self.downstream.closed.with_label_values(&[reason]).inc();
    }

    /// The overflow counter of one rate limit's buckets.
    pub fn rate_limit_overflow(&self, limit: &str) -> IntCounter {
        self.rate_limit_overflow.with_label_values(&[limit])
    }

    pub fn tcp_refused(&self, reason: &str) {
        self.tcp.refused.with_label_values(&[reason]).inc();
    }

    pub fn reload(&self, outcome: &str) {
        self.config.reloads.with_label_values(&[outcome]).inc();
    }

    /// Replaces the certificate expiry gauges with the serving set.
    pub fn set_certificates(&self, certificates: &[(String, &'static str, i64)]) {
        self.config.certificate_expiry.reset();
        for (context, role, expiry) in certificates {
            self.config
                .certificate_expiry
                .with_label_values(&[context.as_str(), role])
                .set(*expiry as f64);
        }
    }

    /// Replaces the per-kind resource error gauges.
    pub fn set_resource_errors(&self, per_kind: &std::collections::BTreeMap<String, usize>) {
        self.config.resource_errors.reset();
        for (kind, count) in per_kind {
            self.config
                .resource_errors
                .with_label_values(&[kind.as_str()])
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A Mapping's series: 1xx-5xx and other, and its latency histogram.
#[derive(Debug)]
pub struct RouteMetrics {
    mapping: Box<str>,
    by_class: [OnceLock<IntCounter>; 6],
    duration: OnceLock<Histogram>,
    retries: OnceLock<IntCounter>,
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

impl RouteMetrics {
    /// Counts a finished request and its duration.
    pub fn record(&self, status: u16, seconds: f64) {
        let class = match status / 100 {
            class @ 1..=5 => usize::from(class - 1),
            _ => 5,
        };
        self.by_class[class]
            .get_or_init(|| {
                metrics()
                    .http
                    .requests
                    .with_label_values(&[&self.mapping, CLASSES[class]])
            })
            .inc();
        self.duration
            .get_or_init(|| metrics().http.duration.with_label_values(&[&self.mapping]))
            .observe(seconds);
    }

    /// Counts one more try of a request.
    pub fn retry(&self) {
        self.retries
            .get_or_init(|| metrics().http.retries.with_label_values(&[&self.mapping]))
            .inc();
    }
}

/// A TCPMapping's series, created with its first connection like a
/// Mapping's.
#[derive(Debug)]
pub struct TunnelMetrics {
    tcp_mapping: Box<str>,
    accepted: OnceLock<IntCounter>,
    active: OnceLock<IntGauge>,
    received: OnceLock<IntCounter>,
    sent: OnceLock<IntCounter>,
}

impl TunnelMetrics {
    /// Counts a new tunnel; it stays active until the guard drops.
    pub fn open(&self) -> ActiveTunnel {
        self.accepted
            .get_or_init(|| {
                metrics()
                    .tcp
                    .connections
                    .with_label_values(&[&self.tcp_mapping])
            })
            .inc();
        let active = self
            .active
            .get_or_init(|| metrics().tcp.active.with_label_values(&[&self.tcp_mapping]))
            .clone();
        active.inc();
        ActiveTunnel(active)
    }

    /// Bytes read from the client and forwarded upstream.
    pub fn received(&self, bytes: usize) {
        self.bytes(&self.received, "received", bytes);
    }

    /// Bytes from the upstream written to the client.
    pub fn sent(&self, bytes: usize) {
        self.bytes(&self.sent, "sent", bytes);
    }

    fn bytes(&self, counter: &OnceLock<IntCounter>, direction: &str, bytes: usize) {
        counter
            .get_or_init(|| {
                metrics()
                    .tcp
                    .bytes
                    .with_label_values(&[&self.tcp_mapping, direction])
            })
            .inc_by(bytes as u64);
    }
}

/// Keeps a tunnel counted as active.
pub struct ActiveTunnel(IntGauge);

impl Drop for ActiveTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}
