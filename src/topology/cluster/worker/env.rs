//! How a master tells a worker process who it is: environment variables,
//! the same for Rust workers (`handoff worker`) and `--worker-cmd`
//! programs (C workers read them through `libhandoff`).
//!
//! | variable | value |
//! |---|---|
//! | `HANDOFF_CHANNEL_FD` | the inherited master channel (SOCK_SEQPACKET), 3 |
//! | `HANDOFF_WORKER_INDEX` | the worker's index, 0-based |
//! | `HANDOFF_GEN` | the cluster's generation (1, then +1 per restart) |
//! | `HANDOFF_DIR` | the cluster's directory (a successor's control socket) |
//! | `HANDOFF_OPTIONS` | the service's options as one JSON object |
//! | `HANDOFF_OPT_<NAME>` | each option alone (`--max-frame` -> `HANDOFF_OPT_MAX_FRAME`) |
//! | `HANDOFF_NODE`, `HANDOFF_NODE_PEERS`, `HANDOFF_NODE_CONNECT_TIMEOUT` | node mode only |
//! | `HANDOFF_NODE_RELAY_TIMEOUT`, `HANDOFF_NODE_HEARTBEAT` | node mode: `--relay-timeout`, `--heartbeat` in seconds (0: off) |
//! | `HANDOFF_IDLE_TIMEOUT` | `--idle-timeout` in seconds (Rust workers; unset: none) |
//! | `HANDOFF_ACCESS_LOG` | `--access-log` path (Rust workers; unset: none) |
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::topology::node::NodeConfig;

/// The descriptor number the channel gets in the worker.
pub const CHANNEL_FD: i32 = 3;

/// What a worker learns from its environment.
///
/// A worker binary of its own (run by the master with `--worker-cmd`)
/// starts so:
///
/// ```no_run
/// use handoff::service::rpc::Rpc;
/// use handoff::topology::cluster::worker::{self, WorkerEnv};
///
/// fn main() -> std::io::Result<()> {
///     // Only a master's child has the environment (and descriptor 3).
///     worker::run::<Rpc>(WorkerEnv::read()?)
/// }
/// ```
#[derive(Debug)]
pub struct WorkerEnv {
    /// The master channel (`HANDOFF_CHANNEL_FD`): a connected SOCK_SEQPACKET
    /// socket inherited as descriptor [`CHANNEL_FD`], owned by this value
    /// from [`WorkerEnv::read`] on; [`super::run`] hands it to
    /// [`MasterLink::new`](super::link::MasterLink::new).
    pub channel: OwnedFd,
    /// `HANDOFF_WORKER_INDEX`: the worker's slot, 0-based, kept across
    /// respawns.
    pub index: usize,
    /// `HANDOFF_GEN`: the cluster's generation (1 when unset).
    pub gen: u64,
    /// `HANDOFF_DIR`: the cluster's directory, where a successor's control
    /// socket is found during a restart; `None` when unset.
    pub dir: Option<PathBuf>,
    /// `HANDOFF_OPTIONS`: the service's options as a JSON object (empty
    /// when unset).
    pub options: Value,
    /// Node mode (`HANDOFF_NODE` set): this node's name, its peers and the
    /// link connect timeout.
    pub node: Option<NodeConfig>,
    /// `HANDOFF_IDLE_TIMEOUT` (seconds): close a client connection idle
    /// this long; `None` when unset or 0.
    pub idle_timeout: Option<std::time::Duration>,
    /// `HANDOFF_ACCESS_LOG`: the access log's path; `None` when unset.
    pub access_log: Option<PathBuf>,
}

/// Sets a worker's environment on `cmd` (the channel itself is put on
/// descriptor [`CHANNEL_FD`] by the spawner). The master calls it before
/// each spawn; `dir` is the cluster's directory, `options` the service's
/// options as JSON.
///
/// ```
/// use std::ffi::OsStr;
/// use std::process::Command;
/// use handoff::topology::cluster::worker::env;
///
/// let mut cmd = Command::new("my-worker");
/// let options = serde_json::json!({"max_frame": 4096});
/// env::set(&mut cmd, 2, 1, "/tmp/mycluster".as_ref(), &options, None);
/// let var = |name: &str| cmd.get_envs().find(|(k, _)| *k == name).and_then(|(_, v)| v);
/// assert_eq!(var("HANDOFF_WORKER_INDEX"), Some(OsStr::new("2")));
/// assert_eq!(var("HANDOFF_CHANNEL_FD"), Some(OsStr::new("3")));
/// assert_eq!(var("HANDOFF_OPT_MAX_FRAME"), Some(OsStr::new("4096")));
/// ```
pub fn set(
    cmd: &mut Command,
    index: usize,
    gen: u64,
    dir: &std::path::Path,
    options: &Value,
    node: Option<&NodeConfig>,
) {
    cmd.env("HANDOFF_CHANNEL_FD", CHANNEL_FD.to_string())
        .env("HANDOFF_WORKER_INDEX", index.to_string())
        .env("HANDOFF_GEN", gen.to_string())
        .env("HANDOFF_DIR", dir)
        .env("HANDOFF_OPTIONS", options.to_string())
        .env("HANDOFF_LOG_LEVEL", log::max_level().to_string().to_ascii_lowercase());
    if let Value::Object(m) = options {
        for (k, v) in m {
            let name = format!("HANDOFF_OPT_{}", k.to_ascii_uppercase().replace('-', "_"));
            match v {
                Value::String(s) => cmd.env(name, s),
                v => cmd.env(name, v.to_string()),
            };
        }
    }
    if let Some(n) = node {
        let peers: Vec<String> = n.peers.iter().map(|(n, a)| format!("{n}={a}")).collect();
        cmd.env("HANDOFF_NODE", &n.name)
            .env("HANDOFF_NODE_PEERS", peers.join(","))
            .env("HANDOFF_NODE_CONNECT_TIMEOUT", n.connect_timeout.as_secs_f64().to_string());
        let secs = |d: Option<std::time::Duration>| d.map_or(0.0, |d| d.as_secs_f64()).to_string();
        cmd.env("HANDOFF_NODE_RELAY_TIMEOUT", secs(n.relay_timeout)).env("HANDOFF_NODE_HEARTBEAT", secs(n.heartbeat));
    }
}

/// Sets the environment of `--idle-timeout` and `--access-log` (each
/// variable removed when the setting is off), after [`set`].
pub fn set_limits(cmd: &mut Command, idle_timeout: Option<std::time::Duration>, access_log: Option<&std::path::Path>) {
    match idle_timeout {
        Some(d) => cmd.env("HANDOFF_IDLE_TIMEOUT", d.as_secs_f64().to_string()),
        None => cmd.env_remove("HANDOFF_IDLE_TIMEOUT"),
    };
    match access_log {
        Some(p) => cmd.env("HANDOFF_ACCESS_LOG", p),
        None => cmd.env_remove("HANDOFF_ACCESS_LOG"),
    };
}

fn var(name: &str) -> io::Result<String> {
    std::env::var(name).map_err(|_| {
        io::Error::new(io::ErrorKind::NotFound, format!("{name} is not set: a worker is started by its master"))
    })
}

fn number<T: std::str::FromStr>(name: &str) -> io::Result<T> {
    let v = var(name)?;
    v.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}={v:?} is not a number")))
}

impl WorkerEnv {
    /// Reads the environment and takes the inherited channel; call it
    /// once, at start-up, before any other thread exists (it removes
    /// `HANDOFF_CHANNEL_FD`, so a second call fails). Outside a worker it
    /// fails with `NotFound`:
    ///
    /// ```
    /// use handoff::topology::cluster::worker::WorkerEnv;
    ///
    /// let e = WorkerEnv::read().unwrap_err();
    /// assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    /// ```
    pub fn read() -> io::Result<WorkerEnv> {
        let fd: i32 = number("HANDOFF_CHANNEL_FD")?;
        // SAFETY: fcntl(F_GETFD) only checks that the descriptor is open.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::other(format!("HANDOFF_CHANNEL_FD={fd} is not an inherited descriptor")));
        }
        let node = match std::env::var("HANDOFF_NODE") {
            Ok(name) => Some(
                NodeConfig::new(
                    &name,
                    &std::env::var("HANDOFF_NODE_PEERS").unwrap_or_default(),
                    number("HANDOFF_NODE_CONNECT_TIMEOUT").unwrap_or(1.5),
                )?
                .with_deadlines(
                    number("HANDOFF_NODE_RELAY_TIMEOUT").unwrap_or(crate::topology::node::RELAY_TIMEOUT_SECS),
                    number("HANDOFF_NODE_HEARTBEAT").unwrap_or(crate::topology::node::HEARTBEAT_SECS),
                ),
            ),
            Err(_) => None,
        };
        let options = match std::env::var("HANDOFF_OPTIONS") {
            Ok(s) => serde_json::from_str(&s)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("HANDOFF_OPTIONS: {e}")))?,
            Err(_) => Value::Object(Default::default()),
        };
        // Taken at most once per process: a second OwnedFd on the same
        // descriptor would close it twice.
        static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other("the master channel was already taken by this process"));
        }
        let env = WorkerEnv {
            // SAFETY: the master set this descriptor up for this process
            // alone; nothing else here refers to it, and TAKEN makes this
            // the only OwnedFd made from it.
            channel: unsafe { OwnedFd::from_raw_fd(fd) },
            index: number("HANDOFF_WORKER_INDEX")?,
            gen: number("HANDOFF_GEN").unwrap_or(1),
            dir: std::env::var_os("HANDOFF_DIR").map(PathBuf::from),
            options,
            node,
            idle_timeout: std::env::var("HANDOFF_IDLE_TIMEOUT")
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
                .map(std::time::Duration::from_secs_f64),
            access_log: std::env::var_os("HANDOFF_ACCESS_LOG").map(PathBuf::from),
        };
        // The channel is this process's alone: children it starts do not
        // inherit it. (The environment is left as it is: a C program may
        // already run threads, and changing it would race with them.)
        // SAFETY: F_SETFD on a descriptor this process owns.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(env)
    }
}
