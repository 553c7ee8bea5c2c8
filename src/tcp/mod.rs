//! TCPMappings (§1.8): raw TCP, or TLS terminated by SNI, tunnelled to an
//! upstream. `table` compiles them into ports, `tunnel` serves the ports,
//! `log` writes one access-log line per tunnel.

mod log;
pub mod table;
pub mod tunnel;
