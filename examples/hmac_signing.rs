//! A pingress binary with a request-signing filter: every request that
//! leaves for an upstream carries an HMAC-SHA256 over its method, path and a
//! timestamp, so the upstream can tell it came through the gateway.
//!
//! ```yaml
//! kind: Filter
//! metadata: {name: sign}
//! spec:
//!   HmacSigning:
//!     key_id: gateway-1
//!     secret: change-me          # or secret_file: /etc/pingress/hmac.key
//! ---
//! kind: FilterPolicy
//! metadata: {name: sign-all}
//! spec:
//!   rules:
//!     - path: "*"
//!       filters: [{name: sign}]
//! ```
//!
//! The upstream recomputes `hex(HMAC-SHA256(secret, "METHOD\nPATH\nTS"))`
//! and compares it with `sig` in `x-pingress-signature: keyId=..,ts=..,sig=..`.

use std::time::{SystemTime, UNIX_EPOCH};

use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;
use pingress::filters::prelude::*;
use serde::Deserialize;

const HEADER: &str = "x-pingress-signature";

struct HmacSigning {
    key_id: String,
    key: PKey<Private>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    key_id: String,
    secret: Option<String>,
    secret_file: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait]
impl Filter for HmacSigning {
    const TYPE: &'static str = "HmacSigning";
    // Only `upstream_request`: the chain skips this filter in the others.
    type Settings = Settings;
    type Arguments = ();
    type State = ();

    fn build(settings: Settings) -> Result<Self, BuildError> {
        let secret = match (settings.secret, settings.secret_file) {
            (Some(secret), None) => secret.into_bytes(),
            (None, Some(path)) => {
                std::fs::read(&path).map_err(|e| format!("secret_file {path:?}: {e}"))?
            }
            _ => return Err("give exactly one of secret and secret_file".into()),
        };
        if secret.len() < 16 {
            return Err("the secret must be at least 16 bytes".into());
        }
        let key = PKey::hmac(&secret).map_err(|e| format!("HMAC key: {e}"))?;
        Ok(HmacSigning {
            key_id: settings.key_id,
            key,
        })
    }

    async fn upstream_request(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        _cx: &mut Cx<'_, Self>,
    ) -> pingora::Result<()> {
        // Signed last, over what the upstream will actually receive (the
        // gateway's rewrites included).
        let path = upstream.uri.path_and_query().map_or("/", |p| p.as_str());
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let message = format!("{}\n{path}\n{timestamp}", upstream.method);
        let signature = Signer::new(MessageDigest::sha256(), &self.key)
            .and_then(|mut signer| {
                signer.update(message.as_bytes())?;
                signer.sign_to_vec()
            })
            .map_err(|e| Error::explain(ErrorType::InternalError, format!("HMAC: {e}")))?;
        let value = format!(
            "keyId={},ts={timestamp},sig={}",
            self.key_id,
            hex(&signature)
        );
        upstream.insert_header(HEADER, value)
    }
}

fn main() -> std::process::ExitCode {
    pingress::Pingress::new().filter::<HmacSigning>().main()
}
