//! The answer a filter (or the gateway itself) writes instead of the
//! upstream's.

use bytes::Bytes;
use http::header::{HeaderName, CONTENT_LENGTH, CONTENT_TYPE, SERVER};
use http::{HeaderValue, StatusCode};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

/// A response the gateway writes itself: its own answers (404, redirects,
/// 503 overloaded...) and those of filters.
pub struct Reply {
    status: StatusCode,
    /// A short tag for the access log and the local-reply metric.
    pub(crate) reason: &'static str,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Reply {
    /// An empty reply.
    pub fn new(status: StatusCode) -> Self {
        Reply {
            status,
            reason: "filter",
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// A plain-text reply; a line break is added.
    pub fn text(status: StatusCode, text: impl std::fmt::Display) -> Self {
        Reply::new(status).body("text/plain; charset=utf-8", format!("{text}\n"))
    }

    /// Adds a header (another value if the name is already there).
    pub fn header(mut self, name: HeaderName, value: impl Into<HeaderValue>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn body(self, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        self.typed_body(HeaderValue::from_static(content_type), body)
    }

    pub(crate) fn typed_body(mut self, content_type: HeaderValue, body: impl Into<Bytes>) -> Self {
        self.headers.retain(|(name, _)| name != CONTENT_TYPE);
        self.headers.push((CONTENT_TYPE, content_type));
        self.body = body.into();
        self
    }

    /// Names the cause in the access log (`note=`) and in
    /// `pingress_local_replies_total{reason}`.
    pub fn reason(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The first value of header `name` the reply carries.
    #[cfg(test)]
    pub(crate) fn header_value(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub async fn send(self, session: &mut Session, server_name: Option<&str>) -> Result<()> {
        let mut header = ResponseHeader::build(self.status, Some(self.headers.len() + 2))?;
        for (name, value) in self.headers {
            header.append_header(name, value)?;
        }
        header.insert_header(CONTENT_LENGTH, self.body.len().to_string())?;
        if let Some(server) = server_name {
            header.insert_header(SERVER, server)?;
        }
        let empty = self.body.is_empty();
        session
            .write_response_header(Box::new(header), empty)
            .await?;
        if !empty {
            session.write_response_body(Some(self.body), true).await?;
        }
        Ok(())
    }
}
