//! The cluster master: accepts, picks a worker, hands the connection over
//! the worker's channel; respawns workers; answers `handoff status`.
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

pub(crate) mod metrics;
mod rebalance;

use super::{
    control_path, Policy, KIND_ORPHAN_HELLO, KIND_PING, KIND_PONG, KIND_REBALANCE, KIND_REOPEN_LOGS,
    KIND_RESTART_PROBED, KIND_RESTART_REQ, KIND_SHUTDOWN, KIND_STATS, KIND_STATUS_REPLY, KIND_STATUS_REQ,
    KIND_TAKEOVER_HELLO,
};
use crate::core::channel::{wire, Channel, ChannelEvent, Msg};
use crate::core::idmap::IdMap;
use crate::core::reactor::{Base, Endpoint, Event, Interest, Listener};
use crate::core::sock;
use crate::topology::node::handover::LinkState;
use crate::topology::supervisor::link;

/// How soon a connection a receiver refused is offered again.
const RETRY_REFUSED: Duration = Duration::from_millis(100);
/// Respawn backoff: a worker that exits or crashes within `STABLE` of its
/// start (a crash loop), or cannot be started, is started again after
/// 100 ms, doubling up to 10 s; one that ran longer, or was killed from
/// outside, is replaced at once.
const RESPAWN_MIN: Duration = Duration::from_millis(100);
const RESPAWN_MAX: Duration = Duration::from_secs(10);
const STABLE: Duration = Duration::from_secs(1);
/// Heartbeat: a PING to every worker this often; a worker silent for
/// `HUNG_AFTER` gets no new connection until it answers again.
const HEARTBEAT: Duration = Duration::from_millis(250);
const HUNG_AFTER: Duration = Duration::from_secs(1);
use crate::topology::restart::Binary;
pub use crate::topology::restart::{request as request_restart, takeover, DEFAULT_TIMEOUT as RESTART_TIMEOUT};

/// What a cluster master (or node manager) runs with: made by the command
/// line (`cluster`, `node`) for [`run`], and by a restart's new master from
/// what the old one sends.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind (`--host`): an IPv4 or IPv6 address (`::1`, `::`
    /// which takes IPv4 clients too), or a name (its first IPv4 address,
    /// else its first IPv6 one).
    pub host: String,
    /// TCP port to listen on; 0 picks a free one (the `ready` line says
    /// which).
    pub port: u16,
    /// Worker processes (slots), at least 1 (the command line takes 1 to
    /// 1024).
    pub workers: usize,
    /// The cluster's directory, home of `control.sock`: made 0700 when
    /// missing; an existing one must be ours and closed to other users.
    pub dir: PathBuf,
    /// How new connections reach workers.
    pub policy: Policy,
    /// The service's options (JSON), passed on to every worker.
    pub options: serde_json::Value,
    /// On a stop, how long workers get to finish open requests before they
    /// are killed; in a restart, how long the connections get to move
    /// (`--grace`, default 5 s).
    pub grace: Duration,
    /// The binary the workers run (`EXE worker`), and the one a restart
    /// starts by default.
    pub exe: PathBuf,
    /// `--worker-cmd`: a program run as each worker instead (a C worker
    /// on libhandoff); it learns everything from its environment.
    pub worker_cmd: Option<PathBuf>,
    /// `-v`/`--log-level` passed on to workers.
    pub log_args: Vec<String>,
    /// Generation: 1 for a fresh start, +1 at each restart.
    pub gen: u64,
    /// Node mode (`handoff node`): the manager of one node.
    pub node: Option<crate::topology::node::NodeConfig>,
    /// Kill and respawn a worker that has not answered for this long.
    pub hang_timeout: Option<Duration>,
    /// `--rebalance`: move busy connections from a hot worker to an idle one.
    pub rebalance: bool,
    /// The command line (after the program name) a restart runs again, so
    /// that the new generation re-reads flags and config file; empty: the
    /// new master copies these settings (`handoff takeover`).
    pub argv: Vec<std::ffi::OsString>,
    /// `--max-conns`: above this many open connections the master stops
    /// accepting (the kernel's backlog holds the rest) until one closes.
    /// Not with the shared policy (workers accept themselves).
    pub max_conns: Option<u64>,
    /// `--idle-timeout`: workers close a client connection idle this long.
    pub idle_timeout: Option<Duration>,
    /// `--access-log`: workers append one line per closed connection here.
    pub access_log: Option<PathBuf>,
    /// `--user NAME`: a master started as root runs its workers as this
    /// user (the master itself stays root). An unknown user, or a master
    /// not root and not already NAME, is an error at start.
    pub user: Option<String>,
    /// `--metrics HOST:PORT`: serve Prometheus metrics at `/metrics` there.
    pub metrics: Option<String>,
    /// Every endpoint to listen on (`--port` on `--host` first, then each
    /// `--listen`); bound by the supervisor, which passes them all on.
    pub listen: Vec<Endpoint>,
    /// `--listen-mode`: the mode of Unix listening sockets' files (0600).
    pub listen_mode: u32,
}

/// The master's copy of a connection a worker serves: the descriptor it
/// sent, kept by the worker's channel after the ACK (`set_keep_acked`), so
/// a handoff costs no dup. `None` until the ACK is absorbed.
pub(crate) struct Held {
    pub(crate) fd: Option<OwnedFd>,
    /// A node link, bound to its worker: closed, not moved, if it dies.
    pub(crate) link: bool,
}

/// One worker slot: its index is stable, its process is replaced.
pub(crate) struct WorkerSlot {
    pub(crate) index: usize,
    pub(crate) child: Option<Child>,
    pub(crate) channel: Option<Channel>,
    /// Bumped at each spawn; events of an older channel are ignored.
    pub(crate) incarnation: u64,
    /// Connections handed to this slot, all incarnations.
    pub(crate) handed: u64,
    /// A copy of every connection this incarnation holds, by channel id,
    /// until the worker reports it closed: if the worker dies, these go
    /// to another worker instead of being lost.
    pub(crate) held: IdMap<Held>,
    /// Served by this incarnation, as the worker reports.
    pub(crate) served: u64,
    /// Served by earlier incarnations.
    pub(crate) served_before: u64,
    /// Node mode: the worker's link table, as it last reported.
    pub(crate) links: Value,
    pub(crate) respawns: u64,
    pub(crate) started: Instant,
    /// Connections the worker sent as its channel died; ours once it is
    /// reaped.
    pub(crate) orphans: Vec<Msg>,
    /// Draining after a restart was aborted: serves no new connections,
    /// respawned when it exits.
    pub(crate) retiring: bool,
    /// The next respawn's delay (zero: at once).
    pub(crate) backoff: Duration,
    pub(crate) respawn_timer: Option<Event>,
    /// The last message from the worker (any message: it is alive).
    pub(crate) last_seen: Instant,
    /// Silent for `HUNG_AFTER`: gets no new connection.
    pub(crate) hung: bool,
    /// Its event loop's busy share and when it said so (heartbeat answer).
    pub(crate) busy: (f64, Instant),
    /// Connections moved to and away from it by rebalancing.
    pub(crate) moved_in: u64,
    pub(crate) moved_out: u64,
    /// When it was last asked to move connections away.
    pub(crate) rebalanced_at: Option<Instant>,
    /// Open connections as the worker last reported (those it accepted
    /// itself included, shared policy).
    pub(crate) reported_open: u64,
}

impl WorkerSlot {
    /// Open connections, counting those still in flight to the worker.
    fn open(&self) -> u64 {
        self.held.len() as u64
    }

    /// Takes new connections: up, and not draining out of an aborted
    /// restart.
    fn live(&self) -> bool {
        !self.retiring && !self.hung && self.channel.as_ref().is_some_and(Channel::is_open)
    }

    /// Running with its channel open (maybe hung or retiring).
    pub(crate) fn up(&self) -> bool {
        self.child.is_some() && self.channel.as_ref().is_some_and(Channel::is_open)
    }

    fn state(&self) -> &'static str {
        if self.child.is_none() {
            "down"
        } else if self.hung {
            "hung"
        } else if self.retiring {
            "retiring"
        } else {
            "up"
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

pub(crate) struct Master {
    pub(crate) base: Base,
    pub(crate) me: Weak<RefCell<Master>>,
    pub(crate) cfg: Config,
    /// The first TCP endpoint's port (0 with Unix endpoints only).
    pub(crate) port: u16,
    /// Every listening endpoint, in order (`--port`, then `--listen`).
    pub(crate) endpoints: Vec<Endpoint>,
    /// One listener per endpoint (empty while stopping or with the
    /// shared policy).
    pub(crate) listeners: Vec<Listener>,
    /// The listening sockets themselves, for the shared policy's workers.
    pub(crate) shared_fds: Vec<OwnedFd>,
    pub(crate) slots: Vec<WorkerSlot>,
    pub(crate) next: usize,
    /// Connections waiting for a live worker (or for that one worker).
    pub(crate) pending: VecDeque<(Option<usize>, Msg)>,
    /// Node mode: new connections whose first frame is not read yet.
    pub(crate) sniffing: HashMap<u64, crate::topology::node::manager::Sniffed>,
    pub(crate) control: Option<Listener>,
    pub(crate) clients: HashMap<u64, Channel>,
    pub(crate) next_client: u64,
    pub(crate) signals: Vec<Event>,
    pub(crate) grace_timer: Option<Event>,
    pub(crate) stopping: bool,
    pub(crate) started: SystemTime,
    /// A restart this master runs as the old generation.
    pub(crate) restart: Option<crate::topology::restart::Outgoing>,
    /// The control channel of the new generation taking over from us.
    pub(crate) successor: Option<Channel>,
    /// The control channel of the old generation handing over to us.
    pub(crate) predecessor: Option<Channel>,
    /// Handing every connection to the successor (restart after READY).
    pub(crate) draining: bool,
    pub(crate) done_timer: Option<Event>,
    /// Connections a receiver refused (out of descriptors), offered again
    /// by `retry_timer`.
    pub(crate) refused: Vec<Msg>,
    pub(crate) retry_timer: Option<Event>,
    /// New side of a takeover until COMMIT: accepts nothing, serves
    /// nothing that moved (the old side can still resume it).
    pub(crate) takeover_pending: bool,
    /// Connections moved to us, held unread until COMMIT.
    pub(crate) moves: Vec<Msg>,
    /// Control clients that are orphaned workers of the previous
    /// generation, handing us their connections.
    pub(crate) orphan_clients: std::collections::HashSet<u64>,
    /// A stop signal that arrived during a takeover, acted on when it ends.
    pub(crate) stop_after_takeover: Option<i32>,
    pub(crate) heartbeat: Option<Event>,
    /// Heartbeats so far (rebalancing looks every other one).
    pub(crate) beats: u64,
    /// Restart: worker channels not read while the successor catches up.
    pub(crate) workers_paused: bool,
    /// A restart asked for while the previous generation was still leaving.
    pub(crate) queued_restart: Option<(Binary, Duration, Option<u64>, bool)>,
    /// Accepting paused because no worker can serve.
    pub(crate) accept_paused: bool,
    /// Fires when the supervisor is gone (we stop then).
    pub(crate) supervisor_watch: Option<Event>,
    /// The executable this master runs, open: a reload (HUP) starts the
    /// new generation from it even if the file at `cfg.exe` was replaced.
    pub(crate) exe_fd: Option<OwnedFd>,
    /// Accepting paused at `--max-conns` open connections.
    pub(crate) at_limit: bool,
    /// `--metrics`: the counters, and the endpoint serving them.
    pub(crate) metrics: metrics::Metrics,
    /// Node mode: `--peers` and etcd's members, merged (`node::membership`).
    pub(crate) membership: Option<crate::topology::node::membership::Membership>,
    /// How many connections the descriptor limit lets this master hold
    /// (one rescue copy each; see [`crate::core::limits`]).
    pub(crate) capacity: u64,
}

/// An endpoint as a client on this host reaches it: a TCP listener on
/// every address (`0.0.0.0`, `::`) at loopback.
pub(crate) fn reachable(ep: &Endpoint) -> Endpoint {
    match ep {
        Endpoint::Tcp(a) if a.ip().is_unspecified() => {
            let ip: std::net::IpAddr = match a.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            Endpoint::Tcp(std::net::SocketAddr::new(ip, a.port()))
        }
        other => other.clone(),
    }
}

pub(crate) fn with(w: &Weak<RefCell<Master>>, f: impl FnOnce(&mut Master)) {
    if let Some(s) = w.upgrade() {
        f(&mut s.borrow_mut());
    }
}

/// Why `--max-conns` and `--policy shared` do not go together.
pub const SHARED_MAX_CONNS: &str =
    "--max-conns needs the master to accept connections: it cannot be used with --policy shared \
     (each worker accepts on its own there)";

/// Starts a cluster from scratch: binds the port, spawns the workers.
pub fn run(cfg: Config) -> io::Result<()> {
    if cfg.workers == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "--workers must be at least 1"));
    }
    if let (Some(_), Policy::Shared) = (cfg.max_conns, cfg.policy) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, SHARED_MAX_CONNS));
    }
    // Before anything is bound: a --max-conns the descriptor limit cannot
    // hold refuses the start.
    crate::core::limits::budget(cfg.max_conns, cfg.workers, cfg.listen.len())?;
    if let Some(p) = &cfg.access_log {
        // Workers open it; a path they cannot write is an error now.
        crate::topology::cluster::worker::access::open_append(p)?;
    }
    if let Some(name) = &cfg.user {
        let u = crate::core::user::RunAs::lookup(name)?;
        log::info!("workers run as {name} (uid {}, gid {})", u.uid, u.gid);
    }
    sock::private_dir(&cfg.dir)?;
    sock::claim_unix_path(&control_path(&cfg.dir))?;
    let mut listen_fds = activated_listeners()?;
    if listen_fds.is_empty() {
        // Not supervised (a master run on its own): bind here. Its Unix
        // socket files stay when it exits (a stale file is replaced at
        // the next start).
        for ep in &cfg.listen {
            listen_fds.push(sock::listen_endpoint(ep, cfg.listen_mode)?);
        }
    }
    run_on(cfg, listen_fds, None)
}

/// The listening sockets the supervisor passed (its own, or systemd's), or
/// those systemd passed directly (socket activation).
fn activated_listeners() -> io::Result<Vec<OwnedFd>> {
    use crate::topology::supervisor::{activation, ENV_LISTEN_FDS};
    let Some(v) = std::env::var_os(ENV_LISTEN_FDS) else {
        return Ok(activation::take().into_iter().map(|(fd, _)| fd).collect());
    };
    std::env::remove_var(ENV_LISTEN_FDS);
    let mut fds = Vec::new();
    for part in v.to_str().unwrap_or("").split(',') {
        let fd: std::os::fd::RawFd = part.trim().parse().unwrap_or(-1);
        if fd < 3 || !sock::is_listening_stream(fd) {
            return Err(io::Error::other(format!("{ENV_LISTEN_FDS}={v:?}: {part:?} is not a listening socket")));
        }
        // SAFETY: the supervisor passed this listening socket to us alone,
        // and names each descriptor once.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: fcntl on our own descriptor has no memory effects.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        log::debug!("serving on the inherited socket {}", sock::local_endpoint(fd.as_raw_fd())?);
        fds.push(fd);
    }
    Ok(fds)
}

/// Runs a master on an already listening socket. `predecessor` is the
/// control channel of the master this one replaces (restart), which
/// goes on handing it connections.
pub(crate) fn run_on(cfg: Config, listen_fds: Vec<OwnedFd>, predecessor: Option<OwnedFd>) -> io::Result<()> {
    run_on_with(cfg, listen_fds, predecessor, None)
}

/// As [`run_on`], serving `--metrics` on `metrics_fd` if given (the
/// listening socket the previous generation passed on) instead of binding
/// `cfg.metrics`.
pub(crate) fn run_on_with(
    cfg: Config,
    listen_fds: Vec<OwnedFd>,
    predecessor: Option<OwnedFd>,
    metrics_fd: Option<OwnedFd>,
) -> io::Result<()> {
    crate::core::signals::ignore_sigpipe();
    let capacity = crate::core::limits::budget(cfg.max_conns, cfg.workers, listen_fds.len())?;
    let supervised = crate::topology::supervisor::link::adopt_from_env()?;
    link::tell(&format!("HANDOFF_MASTER={}", std::process::id()));
    let base = Base::new()?;
    if listen_fds.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "nothing to listen on: give --port or --listen"));
    }
    let endpoints =
        listen_fds.iter().map(|fd| sock::local_endpoint(fd.as_raw_fd())).collect::<io::Result<Vec<Endpoint>>>()?;
    let port = endpoints
        .iter()
        .find_map(|e| match e {
            Endpoint::Tcp(a) => Some(a.port()),
            _ => None,
        })
        .unwrap_or(0);
    let mut cfg = cfg;
    if let Some(n) = cfg.node.as_mut() {
        // Workers reach this node's own workers through this manager too
        // (at its first endpoint; a listener on every address, `0.0.0.0`
        // or `::`, is reached on loopback).
        n.peers.insert(n.name.clone(), reachable(&endpoints[0]));
    }
    let listed: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
    let addr = listed.join(",");

    let master = Rc::new_cyclic(|me| {
        RefCell::new(Master {
            base: base.clone(),
            me: me.clone(),
            cfg: cfg.clone(),
            port,
            endpoints,
            listeners: Vec::new(),
            shared_fds: Vec::new(),
            slots: Vec::new(),
            next: 0,
            pending: VecDeque::new(),
            sniffing: HashMap::new(),
            control: None,
            clients: HashMap::new(),
            next_client: 1,
            signals: Vec::new(),
            grace_timer: None,
            stopping: false,
            started: SystemTime::now(),
            restart: None,
            successor: None,
            predecessor: None,
            draining: false,
            done_timer: None,
            refused: Vec::new(),
            retry_timer: None,
            takeover_pending: predecessor.is_some(),
            moves: Vec::new(),
            orphan_clients: Default::default(),
            stop_after_takeover: None,
            heartbeat: None,
            beats: 0,
            queued_restart: None,
            workers_paused: false,
            accept_paused: false,
            supervisor_watch: None,
            exe_fd: crate::topology::restart::open_exe(&cfg.exe),
            at_limit: false,
            metrics: Default::default(),
            membership: None,
            capacity,
        })
    });
    {
        let mut m = master.borrow_mut();
        if let Some(addr) = &cfg.metrics {
            // Before any worker starts: a port that cannot be bound fails
            // the start.
            m.metrics.serve(&base, addr, metrics_fd, Rc::downgrade(&master))?;
        }
        let handled =
            [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGCHLD];
        for sig in handled.into_iter().chain(crate::core::signals::IGNORED) {
            let w = Rc::downgrade(&master);
            let e = Event::new(&base, sig, Interest::Signal, move || with(&w, |m| m.on_signal(sig)))?;
            e.add(None)?;
            m.signals.push(e);
        }
        for index in 0..cfg.workers {
            m.slots.push(WorkerSlot {
                index,
                child: None,
                channel: None,
                incarnation: 0,
                handed: 0,
                held: IdMap::default(),
                served: 0,
                served_before: 0,
                links: Value::Array(Vec::new()),
                respawns: 0,
                started: Instant::now(),
                orphans: Vec::new(),
                retiring: false,
                backoff: Duration::ZERO,
                respawn_timer: None,
                last_seen: Instant::now(),
                hung: false,
                busy: (0.0, Instant::now()),
                moved_in: 0,
                moved_out: 0,
                rebalanced_at: None,
                reported_open: 0,
            });
            m.spawn(index)?;
        }
        if cfg.policy == Policy::Shared {
            m.shared_fds = listen_fds;
            m.share_listener_with_all();
        } else {
            for fd in listen_fds {
                let w = Rc::downgrade(&master);
                let l = Listener::adopt(&base, fd, move |fd| with(&w, |m| m.accept(fd)))?;
                if m.takeover_pending {
                    l.pause(); // the old generation accepts until COMMIT
                }
                m.listeners.push(l);
            }
        }
        m.bind_control(predecessor.is_some())?;
        let w = Rc::downgrade(&master);
        let hb = Event::new(&base, -1, Interest::Timer, move || with(&w, |m| m.on_heartbeat()))?;
        hb.add(Some(HEARTBEAT))?;
        m.heartbeat = Some(hb);
        if supervised {
            let w = Rc::downgrade(&master);
            m.supervisor_watch = link::watch(&base, move || {
                with(&w, |m| {
                    m.supervisor_watch = None;
                    log::error!("the supervisor is gone: stopping");
                    m.shutdown(libc::SIGTERM);
                })
            })?;
        }
        if let Some(fd) = predecessor {
            m.attach_predecessor(fd)?;
        } else {
            m.notify_serving("READY=1");
        }
    }
    crate::topology::node::membership::start(&master)?;
    log::info!(
        "cluster master pid {} generation {} on {addr}, {} worker(s), policy {}",
        std::process::id(),
        cfg.gen,
        cfg.workers,
        cfg.policy.name()
    );
    // `listen=` when there is more than the port to say: several
    // endpoints, or a Unix one.
    let listen = match master.borrow().endpoints.as_slice() {
        [Endpoint::Tcp(_)] => String::new(),
        _ => format!(" listen={addr}"),
    };
    crate::core::signals::ready(&format!(
        "ready port={port} workers={} dir={} gen={}{listen}",
        cfg.workers,
        cfg.dir.display(),
        cfg.gen
    ));
    base.dispatch()?;
    crate::topology::node::membership::finish(&master);
    log::info!("cluster master generation {} stopped", cfg.gen);
    Ok(())
}

impl Master {
    /// Tells the supervisor (and through it systemd) that this master
    /// serves now, with `state` (`READY=1`...) and a one-line status.
    pub(crate) fn notify_serving(&self, state: &str) {
        link::tell(&format!(
            "HANDOFF_SERVING={}\nHANDOFF_GEN={}\n{state}\nSTATUS=generation {} serving on {} with {} worker(s), master pid {}",
            std::process::id(),
            self.cfg.gen,
            self.cfg.gen,
            self.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            self.slots.len(),
            std::process::id()
        ));
    }

    pub(crate) fn spawn(&mut self, index: usize) -> io::Result<()> {
        let (mine, theirs) = sock::seqpacket_pair()?;
        let mut cmd = match &self.cfg.worker_cmd {
            Some(path) => Command::new(path),
            None => {
                let mut c = Command::new(&self.cfg.exe);
                c.arg("worker").args(&self.cfg.log_args);
                c
            }
        };
        let c = &self.cfg;
        crate::topology::cluster::worker::env::set(&mut cmd, index, c.gen, &c.dir, &c.options, c.node.as_ref());
        crate::topology::cluster::worker::env::set_limits(&mut cmd, c.idle_timeout, c.access_log.as_deref());
        let raw = theirs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (dup2, fcntl) on descriptors it owns.
        unsafe {
            cmd.pre_exec(move || {
                if raw == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(name) = &self.cfg.user {
            crate::core::user::RunAs::lookup(name)?.apply(&mut cmd);
        }
        let child = cmd.spawn().map_err(|e| {
            let who = self.cfg.user.as_ref().map_or(String::new(), |u| format!(" as user {u}"));
            io::Error::new(
                e.kind(),
                format!("spawn worker {index} ({}){who}: {e}", cmd.get_program().to_string_lossy()),
            )
        })?;
        drop(theirs);
        let slot = &mut self.slots[index];
        slot.incarnation += 1;
        let inc = slot.incarnation;
        let w = self.me.clone();
        let channel = Channel::new(&self.base, mine, move |ev| with(&w, |m| m.on_worker(index, inc, ev)))?;
        channel.set_keep_acked(true);
        // Our own worker binary reads CONNS batches; another program
        // (--worker-cmd) may not.
        channel.set_batch(self.cfg.worker_cmd.is_none());
        if self.cfg.worker_cmd.is_none() {
            // Our own worker gives back only what we gave it (checked
            // where it entered); another program's descriptors are checked.
            channel.trust_descriptors();
        }
        if self.cfg.metrics.is_some() {
            // Two clock reads per handover, only when someone scrapes them.
            channel.time_acks(self.metrics.handover_timer());
        }
        log::info!("worker {index} started, pid {}", child.id());
        slot.child = Some(child);
        slot.channel = Some(channel);
        slot.held.clear();
        slot.served = 0;
        slot.started = Instant::now();
        slot.last_seen = Instant::now();
        slot.hung = false;
        slot.busy = (0.0, Instant::now());
        slot.rebalanced_at = None;
        slot.reported_open = 0;
        slot.respawn_timer = None;
        self.share_listener(index);
        self.flush_pending();
        Ok(())
    }

    /// A worker became able to serve: the connections waiting go out.
    fn flush_pending(&mut self) {
        let pending: Vec<(Option<usize>, Msg)> = self.pending.drain(..).collect();
        for (target, m) in pending {
            self.assign_to(target, m);
        }
    }

    /// Shared policy: gives worker `index` every listening socket (one
    /// LISTENER message each).
    fn share_listener(&mut self, index: usize) {
        if self.takeover_pending {
            return;
        }
        let Some(ch) = &self.slots[index].channel else { return };
        for fd in &self.shared_fds {
            match fd.try_clone() {
                Ok(dup) => {
                    let _ = ch.send(Msg {
                        kind: wire::KIND_LISTENER,
                        flags: 0,
                        id: 0,
                        body: Vec::new(),
                        fd: Some(dup),
                        tag: 0,
                    });
                }
                Err(e) => log::error!("worker {index}: cannot share the listener: {e}"),
            }
        }
    }

    pub(crate) fn share_listener_with_all(&mut self) {
        for i in 0..self.slots.len() {
            self.share_listener(i);
        }
    }

    fn accept(&mut self, fd: OwnedFd) {
        self.metrics.accepted();
        if self.cfg.node.is_some() {
            self.sniff(fd);
            if self.cfg.max_conns.is_some() {
                self.update_accepting();
            }
            return;
        }
        let _ = sock::set_nodelay(fd.as_raw_fd());
        if let Some(i) = self.assign_to(None, Msg::conn(fd, Vec::new(), 0)) {
            self.metrics.accepted_by(i);
        }
        if self.cfg.max_conns.is_some() {
            self.update_accepting();
        }
    }

    /// Connections this master answers for: handed to workers and not
    /// reported closed (in flight included), waiting for a worker, being
    /// sniffed (node mode).
    fn open_conns(&self) -> u64 {
        let held: u64 = self.slots.iter().map(WorkerSlot::open).sum();
        held + (self.pending.len() + self.refused.len() + self.sniffing.len()) as u64
    }

    /// Picks a live worker by policy.
    fn pick(&mut self) -> Option<usize> {
        let n = self.slots.len();
        match self.cfg.policy {
            Policy::LeastConn => {
                self.slots.iter().filter(|s| s.live()).min_by_key(|s| (s.open(), s.handed)).map(|s| s.index)
            }
            _ => {
                for k in 0..n {
                    let i = (self.next + k) % n;
                    if self.slots[i].live() {
                        self.next = (i + 1) % n;
                        return Some(i);
                    }
                }
                None
            }
        }
    }

    /// Hands a connection to a worker, keeping a copy until the worker
    /// closes it; keeps it pending if no worker is live.
    pub(crate) fn assign(&mut self, msg: Msg) {
        self.assign_to(None, msg);
    }

    /// As `assign`, to worker `target` if given (node links). Returns the
    /// worker it went to (`None`: waiting, passed to the successor, or
    /// dropped).
    pub(crate) fn assign_to(&mut self, target: Option<usize>, mut msg: Msg) -> Option<usize> {
        if self.draining {
            self.forward(msg);
            return None;
        }
        // A node link goes to the worker it names (moved by a restart).
        let target = target.or_else(|| LinkState::of(&msg).map(|s| s.worker));
        if target.is_some_and(|t| t >= self.slots.len()) {
            log::warn!(
                "a node link for worker {} arrived; this generation has {}: closing it",
                target.unwrap_or(0),
                self.slots.len()
            );
            return None;
        }
        loop {
            let i = match target {
                Some(t) if self.slots[t].live() => t,
                Some(_) => break,
                None => match self.pick() {
                    Some(i) => i,
                    None => break,
                },
            };
            msg.fd.as_ref()?;
            let link = msg.flags & wire::FLAG_NODE_LINK != 0;
            let slot = &mut self.slots[i];
            match slot.channel.as_ref().expect("live slot has a channel").send(msg) {
                Ok(id) => {
                    slot.held.insert(id, Held { fd: None, link });
                    slot.handed += 1;
                    return Some(i);
                }
                Err(back) => msg = back,
            }
        }
        if self.stopping {
            return None; // dropping msg closes the connection
        }
        crate::warn_limited!("no live worker; connections wait ({} pending)", self.pending.len() + 1);
        self.metrics.error(metrics::Fault::NoWorker);
        self.pending.push_back((target, msg));
        None
    }

    fn on_worker(&mut self, index: usize, inc: u64, ev: ChannelEvent) {
        if self.slots[index].incarnation != inc {
            return;
        }
        match ev {
            ChannelEvent::Msg(m) => self.on_worker_msg(index, m),
            // The worker is out of descriptors: our copy is the connection
            // again; it goes elsewhere after a pause.
            ChannelEvent::Refused(m) => {
                self.metrics.error(metrics::Fault::Refused);
                self.slots[index].held.remove(&m.id);
                self.retry_later(m);
            }
            ChannelEvent::Closed { reason, returned, orphans } => {
                // Every descriptor we handed this worker is ours again.
                self.absorb_acked(index);
                self.absorb(index, returned);
                let slot = &mut self.slots[index];
                slot.channel = None;
                match reason {
                    // Our own worker sent garbage: it is broken; replace it.
                    Some(e) if e.kind() == io::ErrorKind::InvalidData => {
                        self.metrics.error(metrics::Fault::Channel);
                        log::error!("worker {index}: bad channel message ({e}); killing pid {}", slot.pid());
                        if let Some(c) = slot.child.as_mut() {
                            let _ = c.kill();
                        }
                    }
                    // EOF or reset: the process is going; SIGCHLD follows.
                    r => log::debug!("worker {index}: channel closed ({r:?})"),
                }
                // They are rescued when the process is reaped, and so are
                // the orphans (connections it sent as it died).
                slot.orphans.extend(orphans);
            }
        }
    }

    /// Takes the descriptors the worker's channel kept after their ACK
    /// into `held` (closing those the worker reported closed meanwhile).
    fn absorb(&mut self, index: usize, msgs: Vec<Msg>) {
        let slot = &mut self.slots[index];
        for m in msgs {
            if let Some(h) = slot.held.get_mut(&m.id) {
                h.fd = m.fd;
            }
        }
    }

    fn absorb_acked(&mut self, index: usize) {
        let acked = self.slots[index].channel.as_ref().map(Channel::take_acked).unwrap_or_default();
        self.absorb(index, acked);
    }

    fn on_worker_msg(&mut self, index: usize, m: Msg) {
        self.absorb_acked(index);
        let slot = &mut self.slots[index];
        slot.last_seen = Instant::now();
        if slot.hung {
            slot.hung = false;
            log::warn!("worker {index} (pid {}) answers again", slot.pid());
            self.update_accepting();
            self.flush_pending();
        }
        match m.kind {
            KIND_PONG => {
                let busy = serde_json::from_slice::<Value>(&m.body).ok().and_then(|v| v["busy"].as_f64());
                self.slots[index].busy = (busy.unwrap_or(0.0).clamp(0.0, 1.0), Instant::now());
            }
            KIND_STATS => match serde_json::from_slice::<Value>(&m.body) {
                Ok(v) => {
                    let slot = &mut self.slots[index];
                    let mut closed = false;
                    for id in v["closed"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
                        closed |= slot.held.remove(&id).is_some();
                    }
                    if closed && self.at_limit {
                        self.update_accepting();
                    }
                    let slot = &mut self.slots[index];
                    slot.served = v["served"].as_u64().unwrap_or(slot.served);
                    slot.reported_open = v["open"].as_u64().unwrap_or(slot.reported_open);
                    if let Some(l) = v.get("links") {
                        slot.links = l.clone();
                    }
                }
                Err(e) => log::warn!("worker {index}: bad stats: {e}"),
            },
            // A connection we handed the worker, given back (restart or
            // rebalancing).
            wire::KIND_CONN if m.flags & (wire::FLAG_RELEASED | wire::FLAG_REBALANCED) != 0 => {
                self.on_release(index, m)
            }
            // Shared policy: a connection the worker accepted itself.
            wire::KIND_CONN => self.assign(m),
            k => log::warn!("worker {index}: unexpected message kind {k}"),
        }
    }

    /// A connection nobody could take now (out of descriptors) is offered
    /// again after a pause.
    pub(crate) fn retry_later(&mut self, m: Msg) {
        self.refused.push(m);
        if self.retry_timer.as_ref().is_some_and(Event::pending) {
            return;
        }
        let w = self.me.clone();
        let t = Event::new(&self.base, -1, Interest::Timer, move || {
            with(&w, |m| {
                let again = std::mem::take(&mut m.refused);
                for msg in again {
                    m.assign(msg);
                }
            })
        });
        match t.and_then(|t| t.add(Some(RETRY_REFUSED)).map(|()| t)) {
            Ok(t) => self.retry_timer = Some(t),
            Err(e) => log::error!("retry timer: {e}"),
        }
    }

    /// A worker let go of a connection we hold (restart): pass it on with
    /// the bytes the worker had read.
    fn on_release(&mut self, index: usize, mut m: Msg) {
        // Our copy is closed: the descriptor that came back replaces it.
        // (One the worker accepted itself, shared policy, had no copy.)
        if m.flags & wire::FLAG_RELEASED != 0 && self.slots[index].held.remove(&m.master_id()).is_none() {
            log::warn!("worker {index}: released connection {} was not handed to it", m.master_id());
        }
        let rebalanced = m.flags & wire::FLAG_REBALANCED != 0;
        m.flags &= !(wire::FLAG_RELEASED | wire::FLAG_REBALANCED);
        m.tag = 0;
        if !rebalanced || self.draining {
            self.assign(m);
            return;
        }
        // It arrives marked as moved: it stays where it lands for a while.
        m.flags |= wire::FLAG_REBALANCED;
        // A rebalancing move: to the idlest other live worker.
        self.slots[index].moved_out += 1;
        let target = self
            .slots
            .iter()
            .filter(|s| s.index != index && s.live())
            .min_by(|a, b| self.load_of(a).total_cmp(&self.load_of(b)).then(a.open().cmp(&b.open())))
            .map(|s| s.index);
        if let Some(t) = target {
            self.slots[t].moved_in += 1;
        }
        self.assign_to(target, m);
    }

    /// A worker's busy share, 0 when its last report is stale.
    fn load_of(&self, s: &WorkerSlot) -> f64 {
        if s.busy.1.elapsed() < rebalance::STALE {
            s.busy.0
        } else {
            0.0
        }
    }

    /// `--rebalance`, every other heartbeat: if one worker is much busier
    /// than another, it is asked to move some busy connections.
    fn rebalance(&mut self) {
        if !self.cfg.rebalance || self.draining || self.stopping || self.restart.is_some() {
            return;
        }
        let loads: Vec<rebalance::Load> = self
            .slots
            .iter()
            .filter(|s| s.live())
            .map(|s| rebalance::Load {
                index: s.index,
                busy: self.load_of(s),
                open: s.open().max(s.reported_open),
                settling: rebalance::settling(s.rebalanced_at),
            })
            .collect();
        let Some((hot, k, cold)) = rebalance::decide(&loads) else { return };
        let slot = &mut self.slots[hot];
        slot.rebalanced_at = Some(Instant::now());
        log::info!(
            "rebalance: worker {hot} is {:.0}% busy, worker {cold} {:.0}%: moving up to {k} of its {} connection(s)",
            loads.iter().find(|l| l.index == hot).map_or(0.0, |l| l.busy * 100.0),
            loads.iter().find(|l| l.index == cold).map_or(0.0, |l| l.busy * 100.0),
            slot.open().max(slot.reported_open)
        );
        if let Some(ch) = &slot.channel {
            let _ = ch.send(Msg::control(KIND_REBALANCE, json!({"count": k}).to_string().into_bytes()));
        }
    }

    /// A worker died: its client connections go to another worker (or
    /// the successor while draining); its node links close, so the far
    /// side notices at once and builds a new link to the respawned worker.
    fn rescue(&mut self, held: Vec<Held>) {
        for h in held {
            if let (false, Some(fd)) = (h.link, h.fd) {
                self.assign(Msg::conn(fd, Vec::new(), 0));
            }
        }
    }

    /// nginx's meanings: TERM/INT stop (a second one: stop now), QUIT
    /// graceful stop, HUP reload and USR2 upgrade (both: a restart with the
    /// binary at the path we were started from), USR1 reopen logs.
    fn on_signal(&mut self, sig: i32) {
        let name = crate::core::signals::name(sig);
        match sig {
            libc::SIGCHLD => {
                self.reap_successor();
                self.reap();
            }
            libc::SIGHUP => {
                log::info!("{name}: reloading (same binary, configuration read again)");
                self.begin_restart(Binary::Running, crate::topology::restart::DEFAULT_TIMEOUT, None, false)
            }
            libc::SIGUSR2 => {
                log::info!("{name}: upgrading to the binary at {}", self.cfg.exe.display());
                let exe = Binary::Path(self.cfg.exe.clone());
                self.begin_restart(exe, crate::topology::restart::DEFAULT_TIMEOUT, None, false)
            }
            libc::SIGUSR1 => {
                log::info!("{name}: reopening logs");
                self.reopen_logs();
            }
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT => {
                if self.stopping && sig != libc::SIGQUIT {
                    log::warn!("{name} again: stopping now");
                    self.kill_stragglers();
                } else {
                    self.shutdown(sig);
                }
            }
            _ => log::warn!("{name} has no meaning here; ignored"),
        }
    }

    fn reap(&mut self) {
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            let Some(child) = slot.child.as_mut() else {
                continue;
            };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            let pid = child.id();
            slot.child = None;
            slot.served_before += slot.served;
            slot.served = 0;
            let retired = std::mem::replace(&mut slot.retiring, false);
            // Everything the worker sent before it died is still in the
            // channel (released connections, closes): read it all
            // before deciding what the worker left behind.
            let (msgs, returned, acked) = match slot.channel.take() {
                Some(c) => {
                    let (msgs, returned) = c.peer_died();
                    (msgs, returned, c.take_acked())
                }
                None => Default::default(),
            };
            self.absorb(index, acked);
            self.absorb(index, returned);
            let orphans = std::mem::take(&mut self.slots[index].orphans);
            for m in orphans.into_iter().chain(msgs) {
                self.on_worker_msg(index, m);
            }
            let slot = &mut self.slots[index];
            let held: Vec<Held> = slot.held.drain().map(|(_, h)| h).collect();
            if self.stopping {
                log::debug!("worker {index} (pid {pid}) exited: {status}");
                continue;
            }
            if self.draining {
                if !held.is_empty() {
                    log::warn!(
                        "worker {index} (pid {pid}) exited while draining: {status}; passing on its connections"
                    );
                }
                self.rescue(held);
                continue;
            }
            if retired && held.is_empty() {
                log::info!("worker {index} (pid {pid}) drained after the aborted restart; respawning");
            } else {
                self.metrics.error(metrics::Fault::WorkerCrash);
                log::warn!(
                    "worker {index} (pid {pid}) exited unexpectedly: {status}; respawning, {} connection(s) go to other workers",
                    held.len()
                );
            }
            slot.respawns += 1;
            // Killed from outside (SIGKILL, SIGTERM) is not a crash loop.
            use std::os::unix::process::ExitStatusExt;
            let killed = matches!(status.signal(), Some(libc::SIGKILL) | Some(libc::SIGTERM));
            if killed {
                slot.backoff = Duration::ZERO;
            }
            self.rescue(held);
            self.respawn(index);
        }
        self.update_accepting();
        if self.stopping && self.slots.iter().all(|s| s.child.is_none()) {
            self.grace_timer = None;
            self.signals.clear();
            self.control = None;
            self.clients.clear();
            self.base.exit(None);
        }
    }

    /// Starts worker `index` again: at once, or after its backoff when it
    /// keeps dying or cannot be started (logged once per attempt).
    fn respawn(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        if slot.child.is_some() || self.stopping || self.draining {
            return;
        }
        if slot.started.elapsed() >= STABLE {
            slot.backoff = Duration::ZERO;
        }
        let delay = slot.backoff;
        slot.backoff = if delay.is_zero() { RESPAWN_MIN } else { (delay * 2).min(RESPAWN_MAX) };
        if delay.is_zero() {
            match self.spawn(index) {
                Ok(()) => return,
                Err(e) => {
                    self.metrics.error(metrics::Fault::Spawn);
                    log::error!("{e}; trying again in {RESPAWN_MIN:?}")
                }
            }
            self.slots[index].backoff = RESPAWN_MIN * 2;
            return self.respawn_later(index, RESPAWN_MIN);
        }
        log::warn!("worker {index} keeps exiting (up {:?}); respawning in {delay:?}", slot.started.elapsed());
        self.respawn_later(index, delay);
    }

    fn respawn_later(&mut self, index: usize, delay: Duration) {
        let w = self.me.clone();
        let t = Event::new(&self.base, -1, Interest::Timer, move || {
            with(&w, |m| {
                m.slots[index].respawn_timer = None;
                if m.slots[index].child.is_some() || m.stopping || m.draining {
                    return;
                }
                if let Err(e) = m.spawn(index) {
                    m.metrics.error(metrics::Fault::Spawn);
                    let next = m.slots[index].backoff;
                    m.slots[index].backoff = (next * 2).min(RESPAWN_MAX);
                    log::error!("{e}; trying again in {next:?}");
                    m.respawn_later(index, next);
                }
                m.update_accepting();
            })
        });
        match t.and_then(|t| t.add(Some(delay)).map(|()| t)) {
            Ok(t) => self.slots[index].respawn_timer = Some(t),
            Err(e) => log::error!("respawn timer: {e}"),
        }
    }

    /// While no worker can serve, or `--max-conns` connections are open,
    /// the master stops accepting: clients wait in the kernel's backlog
    /// instead of in our queue.
    pub(crate) fn update_accepting(&mut self) {
        if self.listeners.is_empty() {
            return;
        }
        if self.takeover_pending || self.stopping || self.draining {
            return;
        }
        let was_paused = self.accept_paused || self.at_limit;
        let can_serve = self.slots.iter().any(WorkerSlot::live);
        if !can_serve && !self.accept_paused {
            log::error!("no worker can serve: not accepting until one is up (clients wait in the backlog)");
            self.accept_paused = true;
        } else if can_serve && self.accept_paused {
            log::warn!("a worker is up: accepting again");
            self.accept_paused = false;
        }
        let full = self.cfg.max_conns.is_some_and(|max| self.open_conns() >= max);
        if full && !self.at_limit {
            crate::warn_limited!(
                "{} open connections (--max-conns): not accepting until one closes (clients wait in the backlog)",
                self.open_conns()
            );
        }
        self.at_limit = full;
        match (was_paused, self.accept_paused || self.at_limit) {
            (false, true) => self.pause_accepting(),
            (true, false) => self.resume_accepting(),
            _ => {}
        }
    }

    /// Stops accepting on every listener (they keep queueing).
    pub(crate) fn pause_accepting(&self) {
        for l in &self.listeners {
            l.pause();
        }
    }

    /// Accepts again on every listener.
    pub(crate) fn resume_accepting(&self) {
        for l in &self.listeners {
            if let Err(e) = l.resume() {
                log::error!("cannot accept: {e}");
            }
        }
    }

    /// Every worker reopens its log files (USR1: the access log was
    /// renamed away by a log rotation): a REOPEN_LOGS message to each.
    pub(crate) fn reopen_logs(&mut self) {
        let Some(path) = &self.cfg.access_log else {
            log::info!("no log file to reopen (this process logs to stderr)");
            return;
        };
        log::info!("workers reopen the access log {}", path.display());
        for slot in &self.slots {
            if let Some(c) = &slot.channel {
                let _ = c.send(Msg::control(KIND_REOPEN_LOGS, Vec::new()));
            }
        }
    }

    /// PINGs every worker; one silent for `HUNG_AFTER` gets no new
    /// connection, and is killed after `--hang-timeout` if set.
    fn on_heartbeat(&mut self) {
        let mut changed = false;
        for slot in &mut self.slots {
            let Some(ch) = &slot.channel else { continue };
            let _ = ch.send(Msg::control(KIND_PING, Vec::new()));
            let silent = slot.last_seen.elapsed();
            if silent >= HUNG_AFTER && !slot.hung {
                slot.hung = true;
                changed = true;
                self.metrics.error(metrics::Fault::WorkerHung);
                log::warn!(
                    "worker {} (pid {}) has not answered for {silent:?}: no new connections go to it",
                    slot.index,
                    slot.pid()
                );
            }
            if let (true, Some(limit)) = (slot.hung, self.cfg.hang_timeout) {
                if silent >= limit {
                    if let Some(c) = slot.child.as_mut() {
                        log::error!(
                            "worker {} (pid {}) hung for {silent:?} (--hang-timeout); killing it",
                            slot.index,
                            c.id()
                        );
                        let _ = c.kill();
                    }
                }
            }
        }
        if changed {
            self.update_accepting();
        }
        self.beats += 1;
        if self.beats.is_multiple_of(2) {
            self.rebalance();
        }
        if let Some(t) = &self.heartbeat {
            let _ = t.add(Some(HEARTBEAT));
        }
    }

    pub(crate) fn shutdown(&mut self, sig: i32) {
        let name = crate::core::signals::name(sig);
        if self.stopping {
            return;
        }
        if self.takeover_pending {
            // We are the generation that will survive: stop once we serve.
            log::info!("{name} while taking over: stopping once the takeover commits");
            self.stop_after_takeover = Some(sig);
            return;
        }
        if let Some(pid) = self.restart.as_ref().and_then(|r| r.successor_pid()) {
            // The stop goes to whichever generation survives: the new one
            // if the takeover commits, us if it aborts.
            log::info!("{name} during a restart: passed on to the new master (pid {pid}); stopping here if it aborts");
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
            self.stop_after_takeover = Some(sig);
            return;
        }
        if self.restart.is_some() {
            self.abort_restart(format!("{name}: stopping"));
        }
        self.stopping = true;
        self.leave_membership();
        log::info!("{name}: stopping; workers get {:?} to finish", self.cfg.grace);
        link::tell(&format!("STOPPING=1\nSTATUS=stopping ({name}): workers get {:?} to finish", self.cfg.grace));
        self.listeners.clear();
        self.shared_fds.clear();
        self.pending.clear();
        for slot in &self.slots {
            if let Some(c) = &slot.channel {
                let _ = c.send(Msg::control(KIND_SHUTDOWN, Vec::new()));
            }
        }
        let w = self.me.clone();
        match Event::new(&self.base, -1, Interest::Timer, move || with(&w, |m| m.kill_stragglers())) {
            Ok(t) => {
                let _ = t.add(Some(self.cfg.grace));
                self.grace_timer = Some(t);
            }
            Err(e) => log::error!("grace timer: {e}"),
        }
        self.reap();
    }

    fn kill_stragglers(&mut self) {
        for slot in &mut self.slots {
            if let Some(c) = slot.child.as_mut() {
                log::warn!(
                    "worker {} (pid {}) still running after {:?}; killing it",
                    slot.index,
                    c.id(),
                    self.cfg.grace
                );
                let _ = c.kill();
            }
        }
    }

    /// Listens on `D/control.sock`. With `replace`, binds beside the
    /// current socket and renames over it, so that `handoff status` always
    /// finds a live master (a successor taking over, or an old master
    /// taking its place back after an aborted restart).
    pub(crate) fn bind_control(&mut self, replace: bool) -> io::Result<()> {
        let ctl = control_path(&self.cfg.dir);
        let w = self.me.clone();
        let on_ctl = move |fd| with(&w, |m| m.accept_control(fd));
        let l = if replace {
            let tmp = self.cfg.dir.join(format!("control.{}.sock", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let l = Listener::bind(&self.base, &Endpoint::Seqpacket(tmp.clone()), on_ctl)?;
            if let Err(e) = std::fs::rename(&tmp, &ctl) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            l.with_path(ctl)
        } else {
            Listener::bind(&self.base, &Endpoint::Seqpacket(ctl), on_ctl)?
        };
        if let Some(old) = self.control.replace(l) {
            old.forget_path(); // the path is the new listener's now
        }
        Ok(())
    }

    fn accept_control(&mut self, fd: OwnedFd) {
        if let Err(e) = sock::check_same_uid(fd.as_raw_fd()) {
            log::warn!("control socket: refused: {e}");
            return;
        }
        let id = self.next_client;
        self.next_client += 1;
        let w = self.me.clone();
        match Channel::new(&self.base, fd, move |ev| with(&w, |m| m.on_control(id, ev))) {
            Ok(c) => {
                self.clients.insert(id, c);
            }
            Err(e) => log::warn!("control socket: {e}"),
        }
    }

    fn on_control(&mut self, id: u64, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Msg(m) if m.kind == KIND_RESTART_REQ => self.on_restart_request(id, &m.body),
            ChannelEvent::Msg(m) if m.kind == KIND_RESTART_PROBED => self.on_restart_probed(id),
            ChannelEvent::Msg(m) if m.kind == KIND_TAKEOVER_HELLO => self.on_takeover_hello(id, &m.body),
            ChannelEvent::Msg(m) if m.kind == KIND_ORPHAN_HELLO => {
                log::warn!(
                    "a worker of the previous generation hands its connections over: {}",
                    String::from_utf8_lossy(&m.body)
                );
                self.orphan_clients.insert(id);
            }
            // An orphaned old worker's connections (and its last stats).
            ChannelEvent::Msg(m) if self.orphan_clients.contains(&id) => {
                if m.kind == wire::KIND_CONN {
                    self.take_moved(m);
                }
            }
            ChannelEvent::Msg(m) if m.kind == KIND_STATUS_REQ => {
                let body = self.status().to_string().into_bytes();
                if let Some(c) = self.clients.get(&id) {
                    let _ = c.send(Msg::control(KIND_STATUS_REPLY, body));
                }
            }
            ChannelEvent::Msg(m) => {
                log::warn!("control socket: unexpected message kind {}; closing", m.kind);
                self.clients.remove(&id);
            }
            ChannelEvent::Refused(_) => {}
            ChannelEvent::Closed { reason, orphans, .. } => {
                self.clients.remove(&id);
                self.on_restart_probed(id);
                if self.orphan_clients.remove(&id) {
                    log::info!("a worker of the previous generation is done handing over");
                    // It exited before our ACK reached it: ours.
                    for m in orphans {
                        self.take_moved(m);
                    }
                } else if let Some(e) = reason {
                    log::warn!("control client {id} refused: {e}");
                }
            }
        }
    }

    fn status(&self) -> Value {
        let mut v = self.status_fields();
        self.membership_status(&mut v);
        v
    }

    fn status_fields(&self) -> Value {
        let started = self.started.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let workers: Vec<Value> = self
            .slots
            .iter()
            .map(|s| {
                json!({
                    "worker": s.index,
                    "pid": s.pid(),
                    "handed": s.handed,
                    "open": s.open(),
                    "served": s.served_before + s.served,
                    "respawns": s.respawns,
                    "state": s.state(),
                    "up_secs": s.started.elapsed().as_secs(),
                    "busy": (self.load_of(s) * 1000.0).round() / 1000.0,
                    "moved_in": s.moved_in,
                    "moved_out": s.moved_out,
                    "links": s.links,
                })
            })
            .collect();
        json!({
            "mode": if self.cfg.node.is_some() { "node" } else { "cluster" },
            "node": self.node_name(),
            "pid": std::process::id(),
            "supervisor": std::env::var(crate::topology::supervisor::ENV_PID).ok().and_then(|p| p.parse::<u32>().ok()),
            "port": self.port,
            "listen": self.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "policy": self.cfg.policy.name(),
            "rebalance": self.cfg.rebalance,
            "gen": self.cfg.gen,
            "started": started,
            "restarting": self.restart.is_some(),
            "pending": self.pending.len(),
            "accepting": !self.listeners.is_empty() && !self.accept_paused && !self.takeover_pending && !self.stopping
                || self.cfg.policy == Policy::Shared && !self.stopping,
            "workers": workers,
            "max_conns": self.cfg.max_conns,
            "open": self.open_conns(),
            "at_limit": self.at_limit,
            "capacity": self.capacity,
            "nofile": crate::core::limits::get().map_or(0, |l| l.soft),
        })
    }
}
