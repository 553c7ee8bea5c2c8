//! The `pingress` binary: the gateway with its built-in filters.

/// Pingora allocates and frees several times per request (header maps,
/// buffers, tasks); mimalloc's thread-local fast paths cost a fraction of
/// glibc malloc's there (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pingress::Pingress::new().main()
}
