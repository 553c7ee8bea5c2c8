//! Serving TCPMappings: raw TCP, or TLS terminated by SNI, tunnelled to an
//! upstream. The snapshot compiles them into ports (`snapshot::tcp`);
//! `tunnel` serves the ports, `log` writes one access-log line per tunnel.

mod log;
pub mod tunnel;
