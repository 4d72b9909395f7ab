//! Cluster mode (seed 001, Node's cluster model): a master accepts every
//! connection and hands it to one of N prefork workers over a socketpair;
//! workers are respawned in their slot when they die.
//!
//! Master <-> worker messages ride the handoff channel (`crate::core::channel`):
//! CONN (a client connection), LISTENER (shared policy), and the kinds
//! below, whose bodies are JSON.
pub mod control;
pub mod master;
pub mod status;
pub mod worker;

use crate::core::channel::wire::KIND_USER;

/// worker -> master: `{"open":n,"served":n,"closed":n}` (coalesced).
pub const KIND_STATS: u16 = KIND_USER;
/// master -> worker: finish open requests and exit.
pub const KIND_SHUTDOWN: u16 = KIND_USER + 1;
/// status client -> master: empty body.
pub const KIND_STATUS_REQ: u16 = KIND_USER + 2;
/// master -> status client: the status JSON.
pub const KIND_STATUS_REPLY: u16 = KIND_USER + 3;
/// `handoff restart` -> old master: `{"binary":path,"timeout":secs}`.
pub const KIND_RESTART_REQ: u16 = KIND_USER + 4;
/// old master -> `handoff restart`: `{"ok":bool,"reason"|"pid","gen"}`.
pub const KIND_RESTART_REPLY: u16 = KIND_USER + 5;
/// `handoff restart` -> old master: the new generation answered on the
/// port; the old one may go (until then it stands by).
pub const KIND_RESTART_PROBED: u16 = KIND_USER + 17;
/// new master -> old master: `{"pid":n}`; answered by a LISTENER message
/// (the listening socket, body = the cluster's config as JSON).
pub const KIND_TAKEOVER_HELLO: u16 = KIND_USER + 6;
/// new master -> old master: workers are up; send the connections.
pub const KIND_TAKEOVER_READY: u16 = KIND_USER + 7;
/// master -> worker: hand every connection back between requests, exit.
pub const KIND_DRAIN: u16 = KIND_USER + 8;
// KIND_USER + 9 was RELEASE: a released connection is now a CONN with
// `wire::FLAG_RELEASED` (it carries its descriptor, so it survives the
// master's death).
/// old master -> new master: everything moved; commit the takeover.
pub const KIND_TAKEOVER_COMMIT: u16 = KIND_USER + 10;
/// new master -> old master: `{"ok":bool,"reason"}`: committed (serving
/// alone from now on), or not able to serve (the old one resumes).
pub const KIND_TAKEOVER_COMMITTED: u16 = KIND_USER + 11;
/// master -> worker: a successor listens on the control socket; should
/// the master die, hand the connections to it (no PDEATHSIG meanwhile).
pub const KIND_TAKEOVER_BEGUN: u16 = KIND_USER + 12;
/// master -> worker: the takeover was aborted; die with the master again.
pub const KIND_TAKEOVER_ENDED: u16 = KIND_USER + 13;
/// orphaned worker -> new master (control socket): CONNs follow.
pub const KIND_ORPHAN_HELLO: u16 = KIND_USER + 14;
/// master -> worker: heartbeat; answered at once by PONG (worker -> master).
pub const KIND_PING: u16 = KIND_USER + 15;
/// worker -> master: the heartbeat's answer to a PING (empty body).
pub const KIND_PONG: u16 = KIND_USER + 16;
/// master -> worker (`--rebalance`): `{"count":k}`: move up to k busy
/// connections away, each between requests (CONN with
/// `wire::FLAG_REBALANCED`; the master hands them to a colder worker).
pub const KIND_REBALANCE: u16 = KIND_USER + 18;
/// master -> worker (the master got USR1): reopen the access log
/// (`--access-log`), which may have been renamed away; empty body.
pub const KIND_REOPEN_LOGS: u16 = KIND_USER + 19;
/// master -> worker (node mode): the whole membership changed (etcd):
/// `A=ADDR,B=ADDR...` as in `HANDOFF_NODE_PEERS`; replaces the worker's peers.
pub const KIND_NODE_PEERS: u16 = KIND_USER + 20;

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
    /// The `--policy` value (`round-robin`, `least-conn`, `shared`), as
    /// logs and `handoff status` show it.
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
