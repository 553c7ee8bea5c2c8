//! One access-log line per tunnel (log target `access`), as text or JSON
//! per the Module's `envoy_log_type`, like HTTP requests' lines.

use std::time::Duration;

use crate::model::AccessLog;

pub struct TunnelEntry<'a> {
    pub client: Option<String>,
    pub port: u16,
    pub sni: Option<&'a str>,
    pub mapping: Option<&'a str>,
    pub upstream: Option<String>,
    /// Bytes from the client, forwarded upstream.
    pub received: u64,
    /// Bytes from the upstream, written to the client.
    pub sent: u64,
    pub duration: Duration,
    /// How the tunnel ended, or why there was none.
    pub note: &'a str,
}

impl TunnelEntry<'_> {
    pub fn render(&self, format: AccessLog) -> String {
        let time = crate::routing::timefmt::now_utc();
        match format {
            AccessLog::Json => serde_json::json!({
                "time": time,
                "client": self.client,
                "protocol": "TCP",
                "port": self.port,
                "sni": self.sni,
                "tcp_mapping": self.mapping,
                "upstream": self.upstream,
                "received": self.received,
                "sent": self.sent,
                "duration_ms": self.duration.as_secs_f64() * 1000.0,
                "note": self.note,
            })
            .to_string(),
            AccessLog::Text => format!(
                "{time} {} \"TCP :{} sni={}\" received={} sent={} {:.3}ms upstream={} \
                 tcp_mapping={} note={}",
                self.client.as_deref().unwrap_or("-"),
                self.port,
                self.sni.unwrap_or("-"),
                self.received,
                self.sent,
                self.duration.as_secs_f64() * 1000.0,
                self.upstream.as_deref().unwrap_or("-"),
                self.mapping.unwrap_or("-"),
                self.note,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json() {
        let entry = TunnelEntry {
            client: Some("10.0.0.1:5555".into()),
            port: 6000,
            sni: None,
            mapping: Some("db.default"),
            upstream: Some("127.0.0.1:5432".into()),
            received: 12,
            sent: 34,
            duration: Duration::from_micros(1500),
            note: "closed",
        };
        let text = entry.render(AccessLog::Text);
        assert!(
            text.ends_with(
                "10.0.0.1:5555 \"TCP :6000 sni=-\" received=12 sent=34 1.500ms \
                 upstream=127.0.0.1:5432 tcp_mapping=db.default note=closed"
            ),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&entry.render(AccessLog::Json)).unwrap();
        assert_eq!(json["tcp_mapping"], "db.default");
        assert_eq!(json["sent"], 34);
    }
}
