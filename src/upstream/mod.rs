//! Upstreams: the `service` syntax, clusters with prepared peers, and the
//! upstream TLS policy checks.

pub mod balancer;
pub mod breaker;
pub mod cluster;
pub mod dns;
pub mod endpoints;
pub mod health;
pub mod policy;
pub mod retry;
pub mod service;
pub mod shadow;
pub mod side;
pub mod tasks;
pub mod trust;
