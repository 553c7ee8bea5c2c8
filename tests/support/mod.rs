//! Integration-test harness: runs the real `pingress` and `pingress-echo`
//! binaries (and the system nginx) as child processes, mints throwaway PKI
//! with openssl, and speaks HTTP/1.1 over raw sockets so tests control every
//! byte (odd request targets, missing Host headers, keep-alive).
//!
//! Every child process is killed on `Drop` and every file lives in a
//! `TempDir` owned by the test, so a failing test leaves nothing behind.

// Each tests/*.rs file compiles its own copy of this module and uses only a
// slice of it; without this every test binary would warn about the rest.
#![allow(dead_code)]

mod client;
mod echo;
mod gateway;
mod nginx;
mod pki;
mod ports;
mod process;
mod redis;
mod resources;
mod tcp;

// The same slicing leaves whole modules unused in some binaries.
#[allow(unused_imports)]
pub use self::{
    client::*, echo::*, gateway::*, nginx::*, pki::*, ports::*, process::*, redis::*, resources::*,
    tcp::*,
};
