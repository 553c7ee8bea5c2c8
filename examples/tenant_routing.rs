//! A pingress binary that routes by tenant: it verifies the bearer JWT
//! (HS256), copies one of its claims into a header, and has the gateway
//! match the Mappings again, so a Mapping with
//! `headers: {x-tenant: acme}` takes acme's traffic. A missing, forged or
//! expired token gets 401 before anything reaches an upstream.
//!
//! ```yaml
//! kind: Filter
//! metadata: {name: tenant}
//! spec:
//!   TenantRouting:
//!     secret: a-shared-hs256-secret
//!     claim: tenant          # default
//!     header: x-tenant       # default
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::hash::MessageDigest;
use openssl::memcmp;
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;
use pingress::filters::prelude::*;
use serde::Deserialize;

struct TenantRouting {
    key: PKey<Private>,
    claim: String,
    header: HeaderName,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    secret: String,
    #[serde(default = "default_claim")]
    claim: String,
    #[serde(default = "default_header")]
    header: String,
}

fn default_claim() -> String {
    "tenant".into()
}

fn default_header() -> String {
    "x-tenant".into()
}

impl TenantRouting {
    /// The claim of a valid token, or why there is none.
    fn tenant(&self, authorization: Option<&HeaderValue>) -> Result<HeaderValue, &'static str> {
        let token = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("a bearer token is required")?;
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("the token is not a JWT");
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| "the token is not base64url")
        };
        let head: serde_json::Value =
            serde_json::from_slice(&decode(header)?).map_err(|_| "the token header is not JSON")?;
        if head["alg"] != "HS256" {
            return Err("only HS256 tokens are accepted");
        }
        let expected = Signer::new(MessageDigest::sha256(), &self.key)
            .and_then(|mut signer| {
                signer.update(format!("{header}.{payload}").as_bytes())?;
                signer.sign_to_vec()
            })
            .map_err(|_| "cannot verify the token")?;
        let given = decode(signature)?;
        if given.len() != expected.len() || !memcmp::eq(&given, &expected) {
            return Err("the token signature is invalid");
        }
        let claims: serde_json::Value = serde_json::from_slice(&decode(payload)?)
            .map_err(|_| "the token claims are not JSON")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if claims["exp"].as_u64().is_some_and(|exp| exp <= now) {
            return Err("the token has expired");
        }
        claims[self.claim.as_str()]
            .as_str()
            .and_then(|t| HeaderValue::from_str(t).ok())
            .ok_or("the token names no tenant")
    }
}

#[async_trait]
impl Filter for TenantRouting {
    const TYPE: &'static str = "TenantRouting";
    type Settings = Settings;
    type Arguments = ();
    type State = ();

    fn build(settings: Settings) -> Result<Self, BuildError> {
        let header = HeaderName::from_bytes(settings.header.as_bytes())
            .map_err(|_| format!("header {:?} is not a header name", settings.header))?;
        let key = PKey::hmac(settings.secret.as_bytes()).map_err(|e| format!("secret: {e}"))?;
        Ok(TenantRouting {
            key,
            claim: settings.claim,
            header,
        })
    }

    async fn request(&self, session: &mut Session, cx: &mut Cx<'_, Self>) -> pingora::Result<Flow> {
        let request = session.req_header_mut();
        // Whatever the client claims itself must never choose a tenant.
        request.remove_header(&self.header);
        match self.tenant(request.headers.get(header::AUTHORIZATION)) {
            Ok(tenant) => {
                request.insert_header(self.header.clone(), tenant)?;
                cx.reroute();
                Ok(Flow::Continue)
            }
            Err(why) => Ok(Flow::Respond(
                Reply::text(StatusCode::UNAUTHORIZED, why)
                    .header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
                    .reason("tenant_unauthorized"),
            )),
        }
    }
}

fn main() -> std::process::ExitCode {
    pingress::Pingress::new().filter::<TenantRouting>().main()
}
