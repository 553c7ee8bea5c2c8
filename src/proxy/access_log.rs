//! One access-log line per request (log target `access`), as text or JSON
//! per the Module's `envoy_log_type`.

use std::time::Duration;

use crate::model::AccessLog;

pub struct AccessEntry<'a> {
    pub client: Option<String>,
    pub method: &'a str,
    pub uri: &'a http::Uri,
    pub protocol: &'a str,
    pub status: u16,
    pub bytes: usize,
    pub duration: Duration,
    pub upstream: Option<&'a str>,
    pub mapping: Option<&'a str>,
    pub request_id: Option<&'a str>,
    /// Why the gateway answered itself, or the error that ended the request.
    pub note: Option<&'a str>,
}

impl AccessEntry<'_> {
    pub fn render(&self, format: AccessLog) -> String {
        let time = crate::routing::timefmt::now_utc();
        match format {
            AccessLog::Json => serde_json::json!({
                "time": time,
                "client": self.client,
                "method": self.method,
                "path": self.uri.to_string(),
                "protocol": self.protocol,
                "status": self.status,
                "bytes": self.bytes,
                "duration_ms": self.duration.as_secs_f64() * 1000.0,
                "upstream": self.upstream,
                "mapping": self.mapping,
                "request_id": self.request_id,
                "note": self.note,
            })
            .to_string(),
            AccessLog::Text => format!(
                "{time} {} \"{} {} {}\" {} {} {:.3}ms upstream={} mapping={} request_id={} note={}",
                self.client.as_deref().unwrap_or("-"),
                self.method,
                self.uri,
                self.protocol,
                self.status,
                self.bytes,
                self.duration.as_secs_f64() * 1000.0,
                self.upstream.unwrap_or("-"),
                self.mapping.unwrap_or("-"),
                self.request_id.unwrap_or("-"),
                self.note.unwrap_or("-"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(uri: &http::Uri) -> AccessEntry<'_> {
        AccessEntry {
            client: Some("10.0.0.1:5555".into()),
            method: "GET",
            uri,
            protocol: "HTTP/1.1",
            status: 200,
            bytes: 12,
            duration: Duration::from_micros(1500),
            upstream: Some("127.0.0.1:9000"),
            mapping: Some("echo.default"),
            request_id: None,
            note: None,
        }
    }

    #[test]
    fn text_and_json() {
        let uri: http::Uri = "/echo/x?a=1".parse().unwrap();
        let text = entry(&uri).render(AccessLog::Text);
        assert!(
            text.ends_with(
                "10.0.0.1:5555 \"GET /echo/x?a=1 HTTP/1.1\" 200 12 1.500ms upstream=127.0.0.1:9000 \
                 mapping=echo.default request_id=- note=-"
            ),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&entry(&uri).render(AccessLog::Json)).unwrap();
        assert_eq!(json["status"], 200);
        assert_eq!(json["mapping"], "echo.default");
        assert_eq!(json["request_id"], serde_json::Value::Null);
    }
}
