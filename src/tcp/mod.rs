//! TCPMappings (§1.8): raw TCP, or TLS terminated by SNI, tunnelled to an
//! upstream. `table` compiles them into ports.

pub mod table;
