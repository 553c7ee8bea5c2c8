//! pingress: an API gateway on Cloudflare's Pingora that reads the
//! Emissary-ingress resource model.
//!
//! Configuration flows through one [`pipeline`]:
//! [`config`] (read YAML) → [`model`] (validate) → [`snapshot`] (compile)
//! → [`proxy`] (serve). See ARCHITECTURE.md for the map.
//!
//! As a library, pingress is the same server with your own [`filters`]:
//! build it with [`Pingress`].

pub mod admin;
mod cli;
pub mod config;
pub mod downstream;
pub mod filters;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod tcp;
pub mod throttle;
pub mod tls;
pub mod upstream;

pub use cli::Pingress;
