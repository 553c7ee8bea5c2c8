//! `x-request-id`: every request gets a fresh UUID, as Envoy's edge does,
//! unless the Module's `preserve_external_request_id` keeps the client's,
//! which it does only for an ID of at most 128 printable characters.

use async_trait::async_trait;
use http::HeaderName;
use pingora::Result;
use serde::Deserialize;

use super::{Cx, Filter, Flow, Session};

/// A `static`, so lookups skip parsing the name and inserts can take
/// its `&'static str`, which Pingora's API handles cheapest.
pub(crate) static HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client request ID kept: UUIDs are 36 characters, trace
/// IDs of other systems a few more.
const MAX_EXTERNAL_ID: usize = 128;

/// Whether a client's request ID may be kept: it is kept by upstreams and
/// logs, so it must be short and printable.
fn is_usable(id: &[u8]) -> bool {
    (1..=MAX_EXTERNAL_ID).contains(&id.len()) && id.iter().all(|b| (0x20..=0x7e).contains(b))
}

pub(crate) struct RequestId {
    preserve_external: bool,
}

impl RequestId {
    pub fn new(preserve_external: bool) -> RequestId {
        RequestId { preserve_external }
    }
}

#[derive(Deserialize)]
pub(crate) struct Settings {
    pub preserve_external_request_id: bool,
}

#[async_trait]
impl Filter for RequestId {
    const TYPE: &'static str = "RequestId";
    type Settings = Settings;
    type Arguments = ();
    type State = ();

    fn build(settings: Settings) -> std::result::Result<Self, crate::filters::BuildError> {
        Ok(RequestId {
            preserve_external: settings.preserve_external_request_id,
        })
    }

    async fn request(&self, session: &mut Session, _cx: &mut Cx<'_, Self>) -> Result<Flow> {
        let headers = &session.req_header().headers;
        let usable = headers
            .get(&HEADER)
            .is_some_and(|v| is_usable(v.as_bytes()));
        if !(self.preserve_external && usable) {
            // The thread's RNG, not the OS's: a getrandom call per request
            // would cost more than the rest of this filter.
            let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
            let id = uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .hyphenated()
                .encode_lower(&mut text);
            let value = http::HeaderValue::from_str(id).map_err(|e| {
                pingora::Error::explain(
                    pingora::ErrorType::InternalError,
                    format!("request ID: {e}"),
                )
            })?;
            session
                .req_header_mut()
                .insert_header(HEADER.as_str(), value)?;
        }
        Ok(Flow::Continue)
    }
}
