//! The `pingress` binary: the gateway with its built-in filters.

fn main() -> std::process::ExitCode {
    pingress::Pingress::new().main()
}
