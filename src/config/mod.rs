//! Stage 1 of the pipeline: the gateway file, resource files, their serde
//! types, and the diagnostics every later stage reports through.

pub mod bounds;
pub mod diagnostics;
pub mod downstream;
pub mod load;
pub mod resources;
pub mod runtime_dir;
pub mod source;
pub mod upstream_tls;
