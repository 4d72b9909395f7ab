//! Cluster mode (seed 001, Node's cluster model): a master accepts every
//! connection and hands it to one of N prefork workers over a socketpair;
//! workers are respawned in their slot when they die.
//!
//! Master <-> worker messages ride the handoff channel (`crate::channel`):
//! CONN (a client connection), LISTENER (shared policy), and the kinds
//! below, whose bodies are JSON.
pub mod master;
pub mod status;
pub mod worker;

use crate::channel::wire::KIND_USER;

/// worker -> master: `{"open":n,"served":n,"closed":n}` (coalesced).
pub const KIND_STATS: u16 = KIND_USER;
/// master -> worker: finish open requests and exit.
pub const KIND_SHUTDOWN: u16 = KIND_USER + 1;
/// status client -> master: empty body.
pub const KIND_STATUS_REQ: u16 = KIND_USER + 2;
/// master -> status client: the status JSON.
pub const KIND_STATUS_REPLY: u16 = KIND_USER + 3;

/// How the master picks a worker for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Connection k goes to live worker k mod N.
    RoundRobin,
    /// To the worker with the fewest open connections.
    LeastConn,
    /// The master does not accept; every worker accepts on the shared listener.
    Shared,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastConn => "least-conn",
            Policy::Shared => "shared",
        }
    }
}

/// The control socket of the master running in `dir`.
pub fn control_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("control.sock")
}
