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
) -> Result<Answer, ExchangeError> {
    let name = || cluster.name.clone();
    let peer = cluster
        .peer()
        .ok_or_else(|| ExchangeError::NoEndpoints { cluster: name() })?;
    let fail = |error| ExchangeError::Upstream {
        cluster: name(),
        error,
    };
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
        .ok_or_else(|| ExchangeError::NoResponse { cluster: name() })?;
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
                return Err(ExchangeError::TooLarge {
                    cluster: name(),
                    at_most,
                });
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

/// A request of the gateway's own that got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{cluster} has no endpoints")]
    NoEndpoints { cluster: String },
    #[error("{cluster}: {error}")]
    Upstream {
        cluster: String,
        error: Box<pingora::Error>,
    },
    #[error("{cluster}: no response")]
    NoResponse { cluster: String },
    #[error("{cluster}: the response body is larger than {at_most} bytes")]
    TooLarge { cluster: String, at_most: usize },
}
