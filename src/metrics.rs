//! Prometheus metrics, served in text format on the admin listener at
//! `/metrics`. A Mapping's series are created on its first request, so
//! ten thousand idle Mappings cost nothing to scrape; after that a request
//! only increments atomics: no label lookup, no lock.
//!
//! Certificate material never appears here; only expiry times, by context.

use std::sync::OnceLock;

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
    requests: IntCounterVec,
    duration: HistogramVec,
    local_replies: IntCounterVec,
    upstream_errors: IntCounterVec,
    retries: IntCounterVec,
    shadows: IntCounterVec,
    pub upstream_connections_new: IntCounter,
    pub upstream_connections_reused: IntCounter,
    pub upstream_tls_handshakes: IntCounter,
    reloads: IntCounterVec,
    pub last_reload_success: Gauge,
    pub generation: Gauge,
    certificate_expiry: GaugeVec,
    resource_errors: IntGaugeVec,
    tcp_connections: IntCounterVec,
    tcp_active: IntGaugeVec,
    tcp_bytes: IntCounterVec,
    tcp_refused: IntCounterVec,
    pub downstream_connections: IntGauge,
    downstream_refused: IntCounterVec,
    downstream_closed: IntCounterVec,
    rate_limit_overflow: IntCounterVec,
}

/// The process's metrics. Registration of fixed names cannot fail; should
/// it, the process has a bug worth stopping for at startup.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().expect("metric names and labels are valid"))
}

impl Metrics {
    fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new_custom(Some("pingress".into()), None)?;
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let metric = IntCounter::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let int_gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<Gauge> {
            let metric = Gauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from request to the end of the response, per Mapping",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["mapping"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let certificate_expiry = GaugeVec::new(
            Opts::new(
                "certificate_expiry_timestamp_seconds",
                "When a certificate in use expires (Unix time), by TLSContext and role",
            ),
            &["context", "role"],
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        let tcp_active = IntGaugeVec::new(
            Opts::new("tcp_connections_active", "Open TCP tunnels, per TCPMapping"),
            &["tcp_mapping"],
        )?;
        registry.register(Box::new(tcp_active.clone()))?;
        let resource_errors = IntGaugeVec::new(
            Opts::new(
                "resource_errors",
                "Resources of the serving configuration with errors, by kind (a resource an \
                 edit broke keeps serving its last good version)",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(resource_errors.clone()))?;
        Ok(Metrics {
            tcp_connections: counter_vec(
                "tcp_connections_total",
                "TCP connections routed to a TCPMapping",
                &["tcp_mapping"],
            )?,
            tcp_active,
            tcp_bytes: counter_vec(
                "tcp_bytes_total",
                "Bytes through TCP tunnels, per TCPMapping; received from clients, sent to them",
                &["tcp_mapping", "direction"],
            )?,
            tcp_refused: counter_vec(
                "tcp_connections_refused_total",
                "TCP connections closed without a tunnel, by reason",
                &["reason"],
            )?,
            requests: counter_vec(
                "requests_total",
                "Requests routed to a Mapping, by status class",
                &["mapping", "class"],
            )?,
            duration,
            local_replies: counter_vec(
                "local_replies_total",
                "Requests the gateway answered itself (404, 301, 421, ...)",
                &["reason"],
            )?,
            upstream_errors: counter_vec(
                "upstream_errors_total",
                "Failed upstream exchanges, by Mapping and kind",
                &["mapping", "kind"],
            )?,
            retries: counter_vec(
                "upstream_retries_total",
                "Upstream tries repeated under a Mapping's retry_policy",
                &["mapping"],
            )?,
            shadows: counter_vec(
                "shadow_requests_total",
                "Copies of requests for shadow Mappings: sent, failed, timeout, skipped \
                 (too many in flight) or not_copied (body too large)",
                &["mapping", "outcome"],
            )?,
            upstream_connections_new: counter(
                "upstream_connections_new_total",
                "Upstream connections opened",
            )?,
            upstream_connections_reused: counter(
                "upstream_connections_reused_total",
                "Requests sent on a pooled upstream connection",
            )?,
            upstream_tls_handshakes: counter(
                "upstream_tls_handshakes_total",
                "TLS handshakes with upstreams",
            )?,
            reloads: counter_vec(
                "reloads_total",
                "Configuration reloads, by outcome",
                &["outcome"],
            )?,
            last_reload_success: gauge(
                "last_reload_success_timestamp_seconds",
                "When the serving configuration was applied (Unix time)",
            )?,
            generation: gauge(
                "config_generation",
                "Generation of the serving configuration",
            )?,
            downstream_connections: int_gauge(
                "downstream_connections",
                "Open client connections, HTTP and TCP, counted from the end of the TLS handshake",
            )?,
            downstream_refused: counter_vec(
                "downstream_connections_refused_total",
                "Client connections closed at once, by the cap they met: max_connections or \
                 max_connections_per_client",
                &["cap"],
            )?,
            downstream_closed: counter_vec(
                "downstream_connections_closed_total",
                "Client connections the gateway closed by itself: handshake_timeout, \
                 handshake_failed, idle_timeout, head_timeout (408), head_too_large (431), \
                 client_policy and host_gone (a reload refused its TLS), max_connection_age",
                &["reason"],
            )?,
            rate_limit_overflow: counter_vec(
                "rate_limit_overflow_total",
                "Requests counted against a limit's shared overflow bucket because all its \
                 in-memory buckets were in use, by limit name",
                &["limit"],
            )?,
            certificate_expiry,
            resource_errors,
            registry,
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
        self.local_replies.with_label_values(&[reason]).inc();
    }

    pub fn upstream_error(&self, mapping: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[mapping, kind])
            .inc();
    }

    pub fn shadow(&self, mapping: &str, outcome: &str) {
        self.shadows.with_label_values(&[mapping, outcome]).inc();
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
        self.downstream_refused.with_label_values(&[cap]).inc();
    }

    pub fn downstream_closed(&self, reason: &str) {
        self.downstream_closed.with_label_values(&[reason]).inc();
    }

    /// The overflow counter of one rate limit's buckets.
    pub fn rate_limit_overflow(&self, limit: &str) -> IntCounter {
        self.rate_limit_overflow.with_label_values(&[limit])
    }

    pub fn tcp_refused(&self, reason: &str) {
        self.tcp_refused.with_label_values(&[reason]).inc();
    }

    pub fn reload(&self, outcome: &str) {
        self.reloads.with_label_values(&[outcome]).inc();
    }

    /// Replaces the certificate expiry gauges with the serving set.
    pub fn set_certificates(&self, certificates: &[(String, &'static str, i64)]) {
        self.certificate_expiry.reset();
        for (context, role, expiry) in certificates {
            self.certificate_expiry
                .with_label_values(&[context.as_str(), role])
                .set(*expiry as f64);
        }
    }

    /// Replaces the per-kind resource error gauges.
    pub fn set_resource_errors(&self, per_kind: &std::collections::BTreeMap<String, usize>) {
        self.resource_errors.reset();
        for (kind, count) in per_kind {
            self.resource_errors
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
                    .requests
                    .with_label_values(&[&self.mapping, CLASSES[class]])
            })
            .inc();
        self.duration
            .get_or_init(|| metrics().duration.with_label_values(&[&self.mapping]))
            .observe(seconds);
    }

    /// Counts one more try of a request.
    pub fn retry(&self) {
        self.retries
            .get_or_init(|| metrics().retries.with_label_values(&[&self.mapping]))
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
                    .tcp_connections
                    .with_label_values(&[&self.tcp_mapping])
            })
            .inc();
        let active = self
            .active
            .get_or_init(|| metrics().tcp_active.with_label_values(&[&self.tcp_mapping]))
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
                    .tcp_bytes
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
