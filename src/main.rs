//! The `pingress` command: Pingora's own flags (`-c`, `-t`, `-u`, `-d`),
//! where `-c` names the gateway file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pingora::server::configuration::Opt;
use pingress::server::{check, load, serve, DEFAULT_GATEWAY_FILE};
use pingress::snapshot::Resolution;

#[derive(Parser, Debug)]
#[command(
    name = "pingress",
    version,
    about = "An Emissary-compatible API gateway on Pingora"
)]
struct Cli {
    #[command(flatten)]
    pingora: Opt,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let gateway_path = PathBuf::from(
        cli.pingora
            .conf
            .clone()
            .unwrap_or_else(|| DEFAULT_GATEWAY_FILE.into()),
    );

    if cli.pingora.test {
        return match load(&gateway_path, Resolution::Skip) {
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
    match serve(cli.pingora, gateway_path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pingress: {message}");
            ExitCode::from(1)
        }
    }
}
