//! CORS (a Mapping's `cors`, else the Module's): preflights are answered by
//! the gateway; a matching `Origin` on other requests gets the allow
//! headers on the response. A request from an origin outside the policy
//! is proxied without CORS headers, as Envoy does.

use std::sync::Arc;

use async_trait::async_trait;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, VARY,
};
use http::StatusCode;
use http::{HeaderValue, Method};
use pingora::http::ResponseHeader;
use pingora::Result;
use serde::Deserialize;

use super::{Cx, Filter, Flow, Reply, Session};
use crate::config::resources::StringOrList;

#[derive(Debug, PartialEq, Eq)]
pub struct CorsPolicy {
    /// `None` allows any origin (`*`); the reply still names the origin.
    origins: Option<Vec<String>>,
    methods: Option<HeaderValue>,
    headers: Option<HeaderValue>,
    exposed_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

/// Emissary's `cors` block: lists, or (v2) comma-separated strings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CorsSpec {
    pub(crate) origins: Option<StringOrList>,
    methods: Option<StringOrList>,
    headers: Option<StringOrList>,
    exposed_headers: Option<StringOrList>,
    #[serde(default)]
    pub(crate) credentials: bool,
    max_age: Option<MaxAge>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MaxAge {
    Seconds(u64),
    Text(String),
}

pub(crate) fn items(list: &Option<StringOrList>) -> Vec<String> {
    list.iter()
        .flat_map(|l| l.to_vec())
        .flat_map(|s| {
            s.split(',')
                .map(|p| p.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

fn joined(
    field: &'static str,
    list: &Option<StringOrList>,
) -> std::result::Result<Option<HeaderValue>, CorsError> {
    let items = items(list);
    if items.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(&items.join(", "))
        .map(Some)
        .map_err(|_| CorsError::HeaderValue { field })
}

/// CORS settings that cannot become response headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CorsError {
    /// The list under this key, joined.
    #[error("{field}: not a valid header value")]
    HeaderValue { field: &'static str },
    #[error("max_age: {0:?} is not a number of seconds")]
    MaxAge(String),
}

impl CorsPolicy {
    pub(crate) fn from_spec(spec: &CorsSpec) -> std::result::Result<CorsPolicy, CorsError> {
        let origins = items(&spec.origins);
        let max_age = match &spec.max_age {
            None => None,
            Some(MaxAge::Seconds(s)) => Some(HeaderValue::from(*s)),
            Some(MaxAge::Text(text)) => {
                let seconds: u64 = text
                    .trim()
                    .parse()
                    .map_err(|_| CorsError::MaxAge(text.clone()))?;
                Some(HeaderValue::from(seconds))
            }
        };
        Ok(CorsPolicy {
            origins: (!origins.iter().any(|o| o == "*")).then_some(origins),
            methods: joined("methods", &spec.methods)?,
            headers: joined("headers", &spec.headers)?,
            exposed_headers: joined("exposed_headers", &spec.exposed_headers)?,
            credentials: spec.credentials,
            max_age,
        })
    }

    fn allows(&self, origin: &str) -> bool {
        self.origins
            .as_ref()
            .is_none_or(|list| list.iter().any(|o| o == origin))
    }
}

/// The built-in instance follows each route's policy; a `kind: Filter` of
/// type `Cors` applies its own to whatever its FilterPolicy selects.
#[derive(Debug)]
pub(crate) struct CorsFilter {
    fixed: Option<Arc<CorsPolicy>>,
}

impl CorsFilter {
    pub fn per_route() -> CorsFilter {
        CorsFilter { fixed: None }
    }
}

#[async_trait]
impl Filter for CorsFilter {
    const TYPE: &'static str = "Cors";
    type Settings = CorsSpec;
    type Arguments = ();
    /// The allowed origin of this request, to echo on the response.
    type State = Option<(HeaderValue, Arc<CorsPolicy>)>;

    fn build(settings: CorsSpec) -> std::result::Result<Self, crate::filters::BuildError> {
        Ok(CorsFilter {
            fixed: Some(Arc::new(
                CorsPolicy::from_spec(&settings).map_err(|e| e.to_string())?,
            )),
        })
    }

    async fn request(&self, session: &mut Session, cx: &mut Cx<'_, Self>) -> Result<Flow> {
        let policy = match &self.fixed {
            Some(policy) => policy.clone(),
            None => match cx.request.route.as_ref().and_then(|r| r.cors().cloned()) {
                Some(policy) => policy,
                None => return Ok(Flow::Continue),
            },
        };
        let req = session.req_header();
        let Some(origin) = req.headers.get(http::header::ORIGIN) else {
            return Ok(Flow::Continue);
        };
        if !origin.to_str().is_ok_and(|o| policy.allows(o)) {
            return Ok(Flow::Continue);
        }
        let preflight = req.method == Method::OPTIONS
            && req
                .headers
                .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
        if !preflight {
            *cx.state = Some((origin.clone(), policy));
            return Ok(Flow::Continue);
        }
        let mut reply = Reply::new(StatusCode::OK).reason("cors_preflight");
        reply = reply
            .header(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())
            .header(VARY, HeaderValue::from_static("Origin"));
        let optional = [
            (ACCESS_CONTROL_ALLOW_METHODS, &policy.methods),
            (ACCESS_CONTROL_ALLOW_HEADERS, &policy.headers),
            (ACCESS_CONTROL_MAX_AGE, &policy.max_age),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                reply = reply.header(name, value.clone());
            }
        }
        if policy.credentials {
            reply = reply.header(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        Ok(Flow::Respond(reply))
    }

    async fn upstream_response(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        cx: &mut Cx<'_, Self>,
    ) -> Result<()> {
        let Some((origin, policy)) = cx.state.take() else {
            return Ok(());
        };
        response.insert_header(ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
        // The answer now differs by Origin; a cache must know.
        let varies = response
            .headers
            .get_all(VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| {
                matches!(token.trim(), "*") || token.trim().eq_ignore_ascii_case("origin")
            });
        if !varies {
            response.append_header(VARY, "Origin")?;
        }
        if policy.credentials {
            response.insert_header(ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
        }
        if let Some(exposed) = &policy.exposed_headers {
            response.insert_header(ACCESS_CONTROL_EXPOSE_HEADERS, exposed.clone())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> std::result::Result<CorsPolicy, CorsError> {
        CorsPolicy::from_spec(&serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn lists_and_comma_strings_are_the_same() {
        let list = policy("{origins: [http://a, http://b], methods: [GET, POST]}").unwrap();
        let text = policy("{origins: 'http://a,http://b', methods: 'GET, POST'}").unwrap();
        assert_eq!(list, text);
        assert!(list.allows("http://b"));
        assert!(!list.allows("http://c"));
        assert_eq!(list.methods.unwrap(), "GET, POST");
    }

    #[test]
    fn star_allows_any_origin() {
        assert!(policy("{origins: ['*']}")
            .unwrap()
            .allows("http://anything"));
    }

    #[test]
    fn max_age_takes_seconds_as_text_or_number() {
        assert_eq!(
            policy("{max_age: '86400'}").unwrap().max_age.unwrap(),
            "86400"
        );
        assert_eq!(policy("{max_age: 60}").unwrap().max_age.unwrap(), "60");
        assert_eq!(
            policy("{max_age: 1d}").unwrap_err(),
            CorsError::MaxAge("1d".into())
        );
    }
}
