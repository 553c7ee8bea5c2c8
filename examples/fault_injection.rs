//! A pingress binary with a fault-injection filter, for testing how clients
//! and the gateway cope with a misbehaving hop: a FilterPolicy picks the
//! paths and the fault.
//!
//! ```yaml
//! kind: Filter
//! metadata: {name: faults}
//! spec:
//!   FaultInjection: {}
//! ---
//! kind: FilterPolicy
//! metadata: {name: chaos}
//! spec:
//!   rules:
//!     - path: /flaky/*
//!       filters:
//!         - name: faults
//!           arguments: {abort: 503, percentage: 10}
//! ```
//!
//! `abort` answers with that status, `delay_ms` holds the request first,
//! `error: true` fails the filter and `panic: true` panics in it: both end
//! as a 500 for the request concerned, and the gateway goes on serving.

use std::time::Duration;

use pingress::filters::prelude::*;
use rand::Rng;
use serde::Deserialize;

struct FaultInjection;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Fault {
    abort: Option<u16>,
    delay_ms: Option<u64>,
    error: bool,
    panic: bool,
    /// How many requests in a hundred get the fault.
    percentage: Option<u8>,
}

#[async_trait]
impl Filter for FaultInjection {
    const TYPE: &'static str = "FaultInjection";
    type Settings = Settings;
    type Arguments = Option<Fault>;
    type State = ();

    fn build(_: Settings) -> Result<Self, BuildError> {
        Ok(FaultInjection)
    }

    async fn request(
        &self,
        _session: &mut Session,
        cx: &mut Cx<'_, Self>,
    ) -> pingora::Result<Flow> {
        let Some(fault) = cx.arguments else {
            return Ok(Flow::Continue);
        };
        let share = fault.percentage.unwrap_or(100).min(100);
        if rand::thread_rng().gen_range(0..100) >= share {
            return Ok(Flow::Continue);
        }
        if let Some(delay) = fault.delay_ms {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if fault.panic {
            panic!("fault injected: panic");
        }
        if fault.error {
            return Err(Error::explain(
                ErrorType::InternalError,
                "fault injected: error",
            ));
        }
        let Some(code) = fault.abort else {
            return Ok(Flow::Continue);
        };
        let status = StatusCode::from_u16(code).map_err(|_| {
            Error::explain(
                ErrorType::InternalError,
                format!("abort: {code} is not an HTTP status"),
            )
        })?;
        Ok(Flow::Respond(
            Reply::text(status, "fault injected: abort").reason("fault_abort"),
        ))
    }
}

fn main() -> std::process::ExitCode {
    pingress::Pingress::new().filter::<FaultInjection>().main()
}
