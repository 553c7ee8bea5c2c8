//! Upstreams: the `service` syntax, clusters with prepared peers, and the
//! upstream TLS policy checks.

pub mod breaker;
pub mod cluster;
pub mod policy;
pub mod retry;
pub mod service;
pub mod shadow;
