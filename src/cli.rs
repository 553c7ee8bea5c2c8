//! The `pingress` command, also for binaries that add their own filters:
//! Pingora's flags (`-c`, `-t`, `-u`, `-d`), where `-c` names the gateway
//! file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pingora::server::configuration::Opt;

use crate::filters::{Filter, Registry};
use crate::pipeline::{load, LastGood};
use crate::server::{check, serve, DEFAULT_GATEWAY_FILE};
use crate::snapshot::Resolution;
use crate::throttle::ThrottledLog;

#[derive(Parser, Debug)]
#[command(
    name = "pingress",
    version,
    about = "An Emissary-compatible API gateway on Pingora"
)]
struct Cli {
    #[command(flatten)]
    pingora: Opt,
    /// Refuse to start while any resource is invalid (an invalid Module
    /// always stops the start). Rollouts use it, so a bad configuration
    /// stalls the rollout while the old pods keep serving.
    #[arg(long)]
    strict: bool,
}

/// A pingress server with the filter types of its binary.
///
/// ```no_run
/// # struct MyFilter;
/// fn main() -> std::process::ExitCode {
///     pingress::Pingress::new()
///         // .filter::<MyFilter>()
///         .main()
/// }
/// ```
pub struct Pingress {
    registry: Registry,
}

impl Default for Pingress {
    fn default() -> Self {
        Pingress::new()
    }
}

impl Pingress {
    pub fn new() -> Pingress {
        Pingress {
            registry: Registry::with_builtins(),
        }
    }

    /// Lets `kind: Filter` resources use `F` as `spec: {<F::TYPE>: ...}`.
    pub fn filter<F: Filter>(mut self) -> Pingress {
        self.registry.register::<F>();
        self
    }

    /// Reads the command line and runs the gateway (or, with `-t`, checks
    /// the configuration) until told to stop.
    pub fn main(self) -> ExitCode {
        let logger =
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
                .build();
        let max_level = logger.filter();
        if log::set_boxed_logger(Box::new(ThrottledLog::new(logger))).is_ok() {
            log::set_max_level(max_level);
        }
        let cli = Cli::parse();
        let gateway_path = PathBuf::from(
            cli.pingora
                .conf
                .clone()
                .unwrap_or_else(|| DEFAULT_GATEWAY_FILE.into()),
        );
        if cli.pingora.test {
            return match load(
                &gateway_path,
                Resolution::Skip,
                &self.registry,
                &LastGood::default(),
            ) {
                Ok(loaded) => {
                    let code = check(&loaded, &mut std::io::stdout()).unwrap_or(2);
                    ExitCode::from(code as u8)
                }
                Err(diagnostic) => {
                    println!("{diagnostic}");
                    ExitCode::from(2)
                }
            };
        }
        match serve(cli.pingora, gateway_path, self.registry, cli.strict) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("pingress: {message}");
                ExitCode::from(1)
            }
        }
    }
}
