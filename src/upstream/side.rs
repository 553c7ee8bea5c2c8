//! Requests the gateway sends on its own account, beside the proxied ones:
//! to an authorizer, or a shadow's copy. One exchange over a pool the
//! caller owns, with a cluster's prepared peer (its TLS included).

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;

use super::cluster::Cluster;

/// What the upstream answered.
pub struct Answer {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Empty when the caller did not keep it.
    pub body: Bytes,
}

/// What to do with the answer's body. It is always read to its end, so the
/// connection can go back to the pool.
pub enum Body {
    Drop,
    /// Keep it; a longer body is an error.
    Keep {
        at_most: usize,
    },
}

/// One request and its answer; `Err` says what went wrong, naming the
/// cluster.
pub async fn exchange(
    connector: &Connector,
    cluster: &Cluster,
    request: RequestHeader,
    body: Option<Bytes>,
    keep: Body,
) -> Result<Answer, String> {
    let peer = cluster
        .peer()
        .ok_or_else(|| format!("{} has no endpoints", cluster.name))?;
    let fail = |e: Box<pingora::Error>| format!("{}: {e}", cluster.name);
    let (mut http, _reused) = connector.get_http_session(&peer).await.map_err(fail)?;
    http.write_request_header(Box::new(request))
        .await
        .map_err(fail)?;
    if let Some(body) = body.filter(|b| !b.is_empty()) {
        http.write_request_body(body, true).await.map_err(fail)?;
    }
    http.finish_request_body().await.map_err(fail)?;
    http.read_response_header().await.map_err(fail)?;
    let head = http
        .response_header()
        .ok_or_else(|| format!("{}: no response", cluster.name))?;
    let status = head.status;
    let headers = head
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let mut kept = BytesMut::new();
    while let Some(chunk) = http.read_response_body().await.map_err(fail)? {
        if let Body::Keep { at_most } = keep {
            if kept.len() + chunk.len() > at_most {
                return Err(format!(
                    "{}: the response body is larger than {at_most} bytes",
                    cluster.name
                ));
            }
            kept.extend_from_slice(&chunk);
        }
    }
    connector
        .release_http_session(http, &peer, peer.options.idle_timeout)
        .await;
    Ok(Answer {
        status,
        headers,
        body: kept.freeze(),
    })
}
