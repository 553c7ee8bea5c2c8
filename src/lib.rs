//! pingress: an API gateway on Cloudflare's Pingora that reads the
//! Emissary-ingress resource model.
//!
//! Configuration flows through one pipeline:
//! [`config`] (read YAML) → [`model`] (validate) → [`snapshot`] (compile)
//! → [`proxy`] (serve). See ARCHITECTURE.md for the map.

pub mod admin;
pub mod config;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod tcp;
pub mod tls;
pub mod upstream;
