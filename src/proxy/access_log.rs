//! One access-log line per request (log target `access`), as text or JSON
//! per the Module's `envoy_log_type`.
//!
//! What a client sent is bounded and, in text, escaped: the target is cut
//! at [`MAX_LOGGED_TARGET`] bytes, and in the quoted fields a `"` or `\`
//! is escaped with a backslash and any other byte outside printable ASCII
//! written as `\xHH`, so no client can forge a field or a line.

use std::fmt::Write as _;
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

/// The longest request target an access line holds; longer ones are cut
/// and end in `...`.
pub const MAX_LOGGED_TARGET: usize = 2048;

/// The longest request ID an access line holds: the RequestId filter keeps
/// only IDs this short, but a request answered before the filters ran
/// still carries the client's.
const MAX_LOGGED_ID: usize = 128;

impl AccessEntry<'_> {
    pub fn render(&self, format: AccessLog) -> String {
        let time = crate::routing::timefmt::now_utc();
        let target = self.uri.to_string();
        let target = cut(&target, MAX_LOGGED_TARGET);
        let request_id = self.request_id.map(|id| cut(id, MAX_LOGGED_ID));
        match format {
            AccessLog::Json => serde_json::json!({
                "time": time,
                "client": self.client,
                "method": self.method,
                "path": target,
                "protocol": self.protocol,
                "status": self.status,
                "bytes": self.bytes,
                "duration_ms": self.duration.as_secs_f64() * 1000.0,
                "upstream": self.upstream,
                "mapping": self.mapping,
                "request_id": request_id,
                "note": self.note,
            })
            .to_string(),
            AccessLog::Text => {
                let mut line = format!(
                    "{time} {} \"{} ",
                    self.client.as_deref().unwrap_or("-"),
                    self.method,
                );
                push_escaped(&mut line, &target);
                let _ = write!(
                    line,
                    " {}\" {} {} {:.3}ms upstream={} mapping={} request_id=",
                    self.protocol,
                    self.status,
                    self.bytes,
                    self.duration.as_secs_f64() * 1000.0,
                    self.upstream.unwrap_or("-"),
                    self.mapping.unwrap_or("-"),
                );
                match &request_id {
                    Some(id) => {
                        line.push('"');
                        push_escaped(&mut line, id);
                        line.push('"');
                    }
                    None => line.push('-'),
                }
                let _ = write!(line, " note={}", self.note.unwrap_or("-"));
                line
            }
        }
    }
}

/// `text` cut at `max` bytes (on a character boundary), with `...` if cut.
fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end]).into()
}

/// Appends `text` for a quoted field: `"` and `\` escaped, bytes outside
/// printable ASCII as `\xHH`.
fn push_escaped(out: &mut String, text: &str) {
    for byte in text.bytes() {
        match byte {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(byte));
            }
            0x20..=0x7e => out.push(char::from(byte)),
            _ => {
                let _ = write!(out, "\\x{byte:02x}");
            }
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

    #[test]
    fn client_values_cannot_forge_fields() {
        let uri: http::Uri = "/a".parse().unwrap();
        let mut forging = entry(&uri);
        forging.request_id = Some("x\" 500 0 upstream=evil \\\u{1b}[2J");
        let text = forging.render(AccessLog::Text);
        assert!(
            text.ends_with(r#"request_id="x\" 500 0 upstream=evil \\\x1b[2J" note=-"#),
            "{text}"
        );
        let long: http::Uri = format!("/{}", "l".repeat(10_000)).parse().unwrap();
        let text = entry(&long).render(AccessLog::Text);
        assert!(text.len() < MAX_LOGGED_TARGET + 200, "{}", text.len());
        assert!(text.contains("lll... HTTP/1.1\""), "{text}");
    }
}
