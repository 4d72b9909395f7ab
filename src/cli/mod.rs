//! The command line every service binary shares: `BIN cluster|server|pair|
//! node|restart|status ...` with the same flags and wire formats as
//! `handoff` itself, which is this command line built with the built-in
//! services (pingpong for pair mode, rpc for cluster and node mode).
//!
//! ```no_run
//! use handoff::service::rpc::Rpc;
//!
//! fn main() -> std::process::ExitCode {
//!     // `mybin cluster --port 8080 --dir /tmp/mybin --max-frame 4096`
//!     handoff::cli::main::<Rpc>("mybin")
//! }
//! ```
use std::path::PathBuf;
use std::process::ExitCode;

mod check;
mod config;

use clap::{Args, FromArgMatches, Parser, Subcommand};
use log::LevelFilter;
use serde_json::Value;

use crate::service::Service;
use crate::topology::cluster;
use crate::topology::pair;
use crate::topology::supervisor;

/// Runs the whole command line with one service for every mode.
pub fn main<S: Service>(name: &'static str) -> ExitCode {
    main_with::<S, S, NoExtra>(name)
}

/// Runs the whole command line: service `P` in pair mode (`server`,
/// `pair`), service `C` in cluster and node mode, and the binary's own
/// extra subcommands `X` (use [`NoExtra`] for none). `name` is the
/// program's name in `--help` and usage lines. Returns the exit status:
/// 0, or 1 after an error (logged by servers, printed by `status` and
/// `restart`), or what an extra subcommand returns. `--help`, `--version`
/// and command-line errors exit at once through clap (0, or 2).
///
/// ```no_run
/// use std::process::ExitCode;
/// use handoff::cli::{self, Extra};
/// use handoff::service::{pingpong::PingPong, rpc::Rpc};
///
/// #[derive(clap::Subcommand)]
/// enum Tools {
///     /// Says hello (`mybin hello`).
///     Hello,
/// }
///
/// impl Extra for Tools {
///     fn run(self) -> ExitCode {
///         match self {
///             Tools::Hello => println!("hello"),
///         }
///         ExitCode::SUCCESS
///     }
/// }
///
/// fn main() -> ExitCode {
///     cli::main_with::<PingPong, Rpc, Tools>("mybin")
/// }
/// ```
pub fn main_with<P: Service, C: Service, X: Extra>(name: &'static str) -> ExitCode {
    let cmd = Cli::<P::Options, C::Options, X>::command_for(name);
    // `--config FILE`: its settings become flags before the user's own.
    let user_args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (argv, loaded) = match config::expand(&cmd, user_args.clone()) {
        Ok(x) => x,
        Err(e) => return fail(&e),
    };
    let matches = match cmd.try_get_matches_from(argv) {
        Ok(m) => m,
        Err(e) => match loaded.as_ref().and_then(|l| l.note_for(&e, &user_args)) {
            // A bad value from the file: say where it is.
            Some(note) => {
                let _ = e.print();
                eprintln!("{note}");
                std::process::exit(e.exit_code());
            }
            None => e.exit(),
        },
    };
    let cli = match Cli::<P::Options, C::Options, X>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    crate::core::logging::init(cli.verbose, cli.log_level);
    let log_args: Vec<String> = match cli.log_level {
        Some(l) => vec!["--log-level".into(), l.to_string()],
        None => (0..cli.verbose).map(|_| "-v".to_string()).collect(),
    };
    // One-shot commands print errors plainly; servers log them.
    let one_shot = matches!(cli.cmd, Cmd::Status(_) | Cmd::Restart(_));
    // Flags that do not go together: refused before anything starts.
    if let Cmd::Cluster(With { args: a, .. }) = &cli.cmd {
        if let Err(e) = cluster_conflicts(a) {
            return fail(&e);
        }
    }
    let result = match cli.cmd {
        Cmd::Extra(x) => return x.run(),
        Cmd::Check(a) => return check::run::<P, C, X>(name, a),
        Cmd::Server(With { args: a, options }) => {
            if let Err(e) = server_conflicts(a.port, a.peer_port) {
                return fail(&e);
            }
            // Servers started by `pair` get the launcher's options.
            let options = match std::env::var("HANDOFF_OPTIONS") {
                Ok(s) => match serde_json::from_str(&s) {
                    Ok(o) => o,
                    Err(e) => return fail(&format!("HANDOFF_OPTIONS: {e}")),
                },
                Err(_) => options,
            };
            let grace = std::time::Duration::from_secs_f64(a.grace);
            let cfg = pair::server::Config {
                host: a.host,
                port: a.port,
                peer_port: a.peer_port,
                dir: a.dir,
                grace,
                listen: a.listen,
                listen_mode: a.listen_mode,
            };
            pair::server::run::<P>(&cfg, &options)
        }
        Cmd::Pair(With { args: a, options }) => {
            if let Err(e) = pair_conflicts(a.ports) {
                return fail(&e);
            }
            let options = to_json(&options);
            let grace = std::time::Duration::from_secs_f64(a.grace);
            if let Some(bad) = a.listen.iter().find(|l| !(l.starts_with("unix:") && l.contains("{port}"))) {
                return fail(&format!(
                    "--listen {bad}: the two servers of a pair each need their own socket: give unix:PATH with {{port}} in PATH (each server's TCP port comes from --ports)"
                ));
            }
            // The servers' own flags: the log level, and each --listen with
            // {port} made the server's port by the launcher.
            let mut extra = log_args.clone();
            extra.extend(a.listen.iter().flat_map(|l| ["--listen".to_string(), l.clone()]));
            if !a.listen.is_empty() {
                extra.extend(["--listen-mode".to_string(), format!("{:o}", a.listen_mode)]);
            }
            std::env::current_exe()
                .and_then(|exe| pair::launcher::run(&exe, a.ports, &a.dir, &a.host, &extra, &options, grace))
        }
        Cmd::Cluster(With { args: a, .. }) if !supervisor::supervised() => return supervise(&a.master),
        Cmd::Node(With { args: a, .. }) if !supervisor::supervised() => return supervise(&a.master),
        Cmd::Cluster(With { args: a, options }) => {
            let worker_cmd = match a.worker_cmd.map(std::path::absolute).transpose() {
                Ok(w) => w,
                Err(e) => return fail(&format!("--worker-cmd: {e}")),
            };
            a.master.config(a.policy, a.grace, log_args).and_then(|mut cfg| {
                cfg.options = to_json(&options);
                cfg.worker_cmd = worker_cmd;
                cfg.rebalance = a.rebalance;
                run_master(cfg)
            })
        }
        Cmd::Node(With { args: a, options }) => a.node_config().and_then(|node| {
            let mut cfg = a.master.config(cluster::Policy::RoundRobin, 5.0, log_args)?;
            cfg.options = to_json(&options);
            cfg.node = Some(node);
            run_master(cfg)
        }),
        Cmd::Restart(a) => {
            let timeout = std::time::Duration::from_secs_f64(a.timeout.max(0.1));
            // A relative --binary means relative to the caller, not to the
            // master's working directory.
            let binary = match a.binary.map(std::path::absolute).transpose() {
                Ok(b) => b,
                Err(e) => return fail(&format!("--binary: {e}")),
            };
            cluster::master::request_restart(&a.dir, binary.as_deref(), timeout, a.listeners_only).map(|v| {
                println!("restarted: generation {} (pid {})", v["gen"], v["pid"]);
            })
        }
        Cmd::Takeover(a) => std::env::current_exe().and_then(|exe| cluster::master::takeover(&a.dir, exe, log_args)),
        Cmd::Status(a) => cluster::status::fetch(&a.dir, std::time::Duration::from_secs(3)).map(|v| {
            if a.json {
                println!("{v}");
            } else {
                print!("{}", cluster::status::render(&v));
            }
        }),
        Cmd::Worker => cluster::worker::WorkerEnv::read().and_then(cluster::worker::run::<C>),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if one_shot => fail(&e.to_string()),
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// A binary's own subcommands, next to the shared ones (`handoff client`).
pub trait Extra: Subcommand {
    /// Runs the subcommand; its exit status is the process's.
    fn run(self) -> ExitCode;
}

/// No extra subcommands.
#[derive(Subcommand, Debug)]
pub enum NoExtra {}

impl Extra for NoExtra {
    fn run(self) -> ExitCode {
        match self {}
    }
}

fn to_json<O: serde::Serialize>(o: &O) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

/// `cluster` and `node` as started by an operator: the supervisor, which
/// runs the same command line again as the master (see
/// [`crate::topology::supervisor`]).
fn supervise(a: &MasterArgs) -> ExitCode {
    let endpoints = match a.endpoints() {
        Ok(e) => e,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Before anything is bound: the master's descriptor budget must hold
    // --max-conns (the limit raised here is what the master inherits).
    let workers = a.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    if let Err(e) = crate::core::limits::budget(a.max_conns, workers, endpoints.len()) {
        log::error!("{e}");
        return ExitCode::FAILURE;
    }
    match supervisor::run(a.pid_file.as_deref(), &endpoints, a.listen_mode) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// A supervised master: a fresh start, or the new generation of a restart.
fn run_master(cfg: cluster::master::Config) -> std::io::Result<()> {
    if std::env::var_os(crate::topology::restart::ENV_TAKEOVER).is_some() {
        std::env::remove_var(crate::topology::restart::ENV_TAKEOVER);
        return crate::topology::restart::takeover_reloaded(cfg);
    }
    cluster::master::run(cfg)
}

/// A pair-mode server cannot be its own peer.
fn server_conflicts(port: u16, peer_port: u16) -> Result<(), String> {
    if port == peer_port {
        return Err(format!("--port and --peer-port are both {port}: a server cannot hand connections to itself"));
    }
    Ok(())
}

fn pair_conflicts(ports: (u16, u16)) -> Result<(), String> {
    if ports.0 == ports.1 {
        return Err(format!("--ports {0},{0}: the two servers need two different ports", ports.0));
    }
    Ok(())
}

/// Cluster flags that do not go together.
fn cluster_conflicts(a: &ClusterArgs) -> Result<(), String> {
    if a.master.max_conns.is_some() && a.policy == cluster::Policy::Shared {
        return Err(cluster::master::SHARED_MAX_CONNS.to_string());
    }
    if a.worker_cmd.is_some() {
        let ours = [
            ("--idle-timeout", a.master.idle_timeout.is_some_and(|t| t > 0.0)),
            ("--access-log", a.master.access_log.is_some()),
        ];
        if let Some((flag, _)) = ours.iter().find(|(_, on)| *on) {
            return Err(format!(
                "{flag} is done by handoff's own workers: a --worker-cmd program (a C worker) does not do it"
            ));
        }
    }
    Ok(())
}

/// A command's error on stderr, exit 1.
fn fail(msg: &str) -> ExitCode {
    eprintln!("handoff: error: {msg}");
    ExitCode::FAILURE
}

#[derive(Parser)]
#[command(version, about = "Move live TCP connections between processes (SCM_RIGHTS)")]
struct Cli<PO: Args, CO: Args, X: Subcommand> {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log level: off, error, warn, info, debug, trace (overrides -v).
    #[arg(long, global = true, value_name = "L")]
    log_level: Option<LevelFilter>,
    #[command(subcommand)]
    cmd: Cmd<PO, CO, X>,
}

impl<PO: Args, CO: Args, X: Subcommand> Cli<PO, CO, X> {
    fn command_for(name: &'static str) -> clap::Command {
        use clap::CommandFactory;
        // A flag given twice takes the later value: the user's flags come
        // after a config file's settings, and win.
        let cmd = Self::command().name(name).bin_name(name).args_override_self(true);
        if name == "handoff" {
            return cmd;
        }
        cmd.about(format!(
            "{name}: a service on handoff (pair, cluster, node and hot restart, moving live connections between processes)"
        ))
    }
}

/// A mode's own flags and the service's.
#[derive(Args)]
struct With<A: Args, O: Args> {
    #[command(flatten)]
    args: A,
    #[command(flatten)]
    options: O,
}

#[derive(Subcommand)]
enum Cmd<PO: Args, CO: Args, X: Subcommand> {
    /// One pair-mode server: answers a request, hands the connection to its peer.
    Server(With<ServerArgs, PO>),
    /// Runs both servers of a pair (two processes) until SIGINT/SIGTERM/SIGQUIT;
    /// passes SIGHUP/SIGUSR1/SIGUSR2 on to them.
    Pair(With<PairArgs, PO>),
    /// Cluster master: accepts and hands each connection to a prefork worker.
    Cluster(With<ClusterArgs, CO>),
    /// A node (manager + workers) whose workers relay to other nodes' workers.
    Node(With<NodeArgs, CO>),
    /// Prints a running master's per-worker table.
    Status(StatusArgs),
    /// Hot restart: a new master takes over the listener and every live
    /// connection; exits 0 once the new generation has committed and answered.
    Restart(RestartArgs),
    /// The new master of a restart (started by the old one).
    #[command(hide = true)]
    Takeover(TakeoverArgs),
    /// A cluster worker (started by the master, which sets its environment).
    #[command(hide = true)]
    Worker,
    /// Checks a config file without starting anything (as `nginx -t`):
    /// exit 0 if `MODE --config FILE` would start, else 1 and why.
    Check(check::CheckArgs),
    #[command(flatten)]
    Extra(X),
}

#[derive(Args)]
struct ServerArgs {
    /// TCP port to listen on (0 picks a free one; see the ready line).
    #[arg(long)]
    port: u16,
    /// The peer server's port; its handoff socket is DIR/PEER_PORT.sock.
    #[arg(long)]
    peer_port: u16,
    /// Directory for the handoff sockets and request logs (made 0700).
    #[arg(long)]
    dir: PathBuf,
    /// Address to bind: IPv4 or IPv6 (`::1`; `::` takes IPv4 clients
    /// too), or a name (its first IPv4 address, else its first IPv6 one).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Seconds open requests get to finish on SIGTERM/SIGINT/SIGQUIT, and
    /// connections to settle before an in-place restart on SIGHUP/SIGUSR2
    /// (0 to 86400).
    #[arg(long, default_value_t = 5.0, allow_hyphen_values = true, value_parser = parse_secs)]
    grace: f64,
    /// Settings from this TOML file (`key = value` for each `--key value`;
    /// flags given here override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Also serve clients here (repeatable): HOST:PORT, [V6]:PORT or
    /// unix:PATH. `--port` stays the server's identity (its handoff socket
    /// is DIR/PORT.sock).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    listen: Vec<crate::core::reactor::Endpoint>,
    /// Mode of the Unix listening sockets' files, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "0600", value_parser = parse_mode)]
    listen_mode: u32,
}

#[derive(Args)]
struct PairArgs {
    /// The two ports, comma separated.
    #[arg(long, default_value = "7000,7001", value_parser = parse_ports)]
    ports: (u16, u16),
    #[arg(long, default_value = "run")]
    dir: PathBuf,
    /// Address to bind: IPv4 or IPv6 (`::1`; `::` takes IPv4 clients
    /// too), or a name (its first IPv4 address, else its first IPv6 one).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Each server's --grace (see `server --help`).
    #[arg(long, default_value_t = 5.0, allow_hyphen_values = true, value_parser = parse_secs)]
    grace: f64,
    /// Settings from this TOML file (`key = value` for each `--key value`;
    /// flags given here override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Each server also listens on unix:PATH, `{port}` in PATH replaced
    /// by the server's port (repeatable): `unix:/run/pp.{port}.sock`.
    #[arg(long, value_name = "unix:PATH")]
    listen: Vec<String>,
    /// Mode of those sockets' files, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "0600", value_parser = parse_mode)]
    listen_mode: u32,
}

/// What a cluster master and a node manager both take.
#[derive(Args)]
struct MasterArgs {
    /// TCP port to listen on, on --host (0 picks a free one; see the ready
    /// line): the same as `--listen HOST:PORT`. Needed unless --listen is
    /// given.
    #[arg(long, required_unless_present = "listen")]
    port: Option<u16>,
    /// Number of workers, 1 to 1024 (default: number of CPUs).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_workers)]
    workers: Option<usize>,
    /// Directory for the control socket (made 0700).
    #[arg(long)]
    dir: PathBuf,
    /// Address to bind: IPv4 or IPv6 (`::1`; `::` takes IPv4 clients
    /// too), or a name (its first IPv4 address, else its first IPv6 one).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Kill and respawn a worker that has not answered the master's
    /// heartbeat for this many seconds (default: only stop giving it
    /// connections while it is silent).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_secs)]
    hang_timeout: Option<f64>,
    /// Write the service's pid (the supervisor's, stable across restarts)
    /// here, atomically; removed at a clean stop.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Settings from this TOML file (`key = value` for each `--key value`;
    /// flags given here override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// At this many open connections stop accepting (the kernel's backlog
    /// holds new clients) until one closes. Not with --policy shared.
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = parse_max_conns)]
    max_conns: Option<u64>,
    /// Close a client connection that has sent nothing and has nothing to
    /// be answered for this many seconds (0 to 86400; 0: never, the default).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, value_parser = parse_secs)]
    idle_timeout: Option<f64>,
    /// Append one line per closed client connection to this file (workers
    /// write it; USR1 to the master reopens it).
    #[arg(long, value_name = "PATH")]
    access_log: Option<PathBuf>,
    /// Run the workers as this user (the master, started as root, binds
    /// first and stays root); a master not started as root accepts only
    /// the user it already runs as.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (the master's
    /// own event loop; IPv6 in brackets: [::1]:9100).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    metrics: Option<String>,
    /// Also listen here (repeatable): HOST:PORT, [V6]:PORT or unix:PATH (a
    /// Unix stream socket; a stale file of a dead server is replaced, a
    /// live one refuses the start). Clients are served the same on all.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    listen: Vec<crate::core::reactor::Endpoint>,
    /// Mode of the Unix listening sockets' files, in octal (0660 lets the
    /// socket's group connect).
    #[arg(long, value_name = "OCTAL", default_value = "0600", value_parser = parse_mode)]
    listen_mode: u32,
}

impl MasterArgs {
    /// Every endpoint to listen on: `--host`:`--port` first, then each
    /// `--listen` in order.
    fn endpoints(&self) -> std::io::Result<Vec<crate::core::reactor::Endpoint>> {
        let mut all = Vec::new();
        if let Some(port) = self.port {
            all.push(crate::core::reactor::Endpoint::Tcp(crate::core::sock::resolve(&self.host, port)?));
        }
        all.extend(self.listen.iter().cloned());
        Ok(all)
    }
}

impl MasterArgs {
    fn config(
        self,
        policy: cluster::Policy,
        grace: f64,
        log_args: Vec<String>,
    ) -> std::io::Result<cluster::master::Config> {
        let listen = self.endpoints()?;
        Ok(cluster::master::Config {
            listen,
            listen_mode: self.listen_mode,
            host: self.host,
            port: self.port.unwrap_or(0),
            workers: self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            dir: self.dir,
            policy,
            options: serde_json::Value::Null,
            worker_cmd: None,
            grace: std::time::Duration::from_secs_f64(grace.max(0.0)),
            // A new master of a restart keeps the path the service was
            // started from (its own may be /proc/self/fd/N).
            exe: match std::env::var_os(crate::topology::restart::ENV_EXE) {
                Some(p) => PathBuf::from(p),
                None => std::env::current_exe()?,
            },
            log_args,
            gen: supervisor::take_gen(),
            node: None,
            hang_timeout: self.hang_timeout.map(std::time::Duration::from_secs_f64),
            rebalance: false,
            argv: std::env::args_os().skip(1).collect(),
            max_conns: self.max_conns,
            idle_timeout: self.idle_timeout.filter(|s| *s > 0.0).map(std::time::Duration::from_secs_f64),
            // Workers and a restart's new master may run elsewhere.
            access_log: self.access_log.map(std::path::absolute).transpose()?,
            user: self.user,
            metrics: self.metrics,
        })
    }
}

#[derive(Args)]
struct ClusterArgs {
    #[command(flatten)]
    master: MasterArgs,
    #[arg(long, value_enum, default_value = "round-robin")]
    policy: cluster::Policy,
    /// Seconds workers get to finish open requests on SIGTERM (0 to 86400).
    #[arg(long, default_value_t = 5.0, allow_hyphen_values = true, value_parser = parse_secs)]
    grace: f64,
    /// Run this program as each worker instead of this binary (a C worker
    /// on libhandoff; it reads its channel from the environment).
    #[arg(long, value_name = "PATH")]
    worker_cmd: Option<PathBuf>,
    /// Move busy keep-alive connections from a much busier worker to an
    /// idle one, between requests (live rebalancing).
    #[arg(long)]
    rebalance: bool,
}

#[derive(Args)]
struct NodeArgs {
    /// This node's name.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    master: MasterArgs,
    /// Other nodes: B=HOST:PORT[,C=unix:PATH...] (`unix:PATH`: a node on
    /// this host started with `--listen unix:PATH`).
    #[arg(long, default_value = "")]
    peers: String,
    /// Seconds from connect to the end of the link handshake (0 to 86400).
    #[arg(long, default_value_t = 1.5, allow_hyphen_values = true, value_parser = parse_secs)]
    connect_timeout: f64,
    /// Seconds a relay waits for its answer before it fails with a
    /// "timeout" error (0: no deadline; 0 to 86400).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::topology::node::RELAY_TIMEOUT_SECS,
          allow_hyphen_values = true, value_parser = parse_secs)]
    relay_timeout: f64,
    /// Seconds of silence after which a link pings its far end; after 3
    /// silent intervals the link is dead (0: no heartbeats; 0 to 86400).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::topology::node::HEARTBEAT_SECS,
          allow_hyphen_values = true, value_parser = parse_secs)]
    heartbeat: f64,
    /// Membership through etcd: its client URLs,
    /// http://HOST:PORT[,http://HOST:PORT...]. The node registers itself
    /// under --etcd-prefix and watches it; merged with --peers.
    #[arg(long, value_name = "URLS")]
    etcd: Option<String>,
    /// Key prefix of the nodes in etcd (a node's key: prefix + name).
    #[arg(long, default_value = crate::topology::node::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Seconds of the node's etcd lease (kept alive; a dead node's key goes
    /// when it runs out).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::topology::node::etcd::DEFAULT_TTL)]
    etcd_ttl: u64,
    /// The address registered in etcd, HOST:PORT or unix:PATH (default:
    /// the node's first TCP listener).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
}

impl NodeArgs {
    /// The node's name, peers and etcd settings, checked.
    fn node_config(&self) -> std::io::Result<crate::topology::node::NodeConfig> {
        crate::topology::node::NodeConfig::new(&self.name, &self.peers, self.connect_timeout)?
            .with_deadlines(self.relay_timeout, self.heartbeat)
            .with_etcd(self.etcd.as_deref(), &self.etcd_prefix, self.etcd_ttl, self.advertise.as_deref())
    }
}

#[derive(Args)]
struct StatusArgs {
    #[arg(long)]
    dir: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RestartArgs {
    #[arg(long)]
    dir: PathBuf,
    /// The new binary (default: the running master's own).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Seconds the new master gets to take over before the restart is
    /// abandoned (0.1 to 86400).
    #[arg(long, default_value_t = 10.0, allow_hyphen_values = true, value_parser = parse_secs)]
    timeout: f64,
    /// Benchmark contrast: move only the listener and cut the old
    /// connections (a listener-only restart with zero drain time).
    #[arg(long)]
    listeners_only: bool,
}

#[derive(Args)]
struct TakeoverArgs {
    #[arg(long)]
    dir: PathBuf,
}

/// Most workers a master runs (each is a process with its own channel).
const MAX_WORKERS: usize = 1024;

/// A duration in seconds: a finite number from 0 to one day.
fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=86_400.0).contains(&v) {
        return Err(format!("'{s}' is out of range: give 0 to 86400 seconds"));
    }
    Ok(v)
}

/// `HOST:PORT`, port 0 to 65535 (the address is resolved and bound at
/// start, where an error names it).
fn parse_host_port(s: &str) -> Result<String, String> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("'{s}': give HOST:PORT, e.g. 127.0.0.1:9100"))?;
    port.parse::<u16>().map_err(|_| format!("'{s}': '{port}' is not a port (0 to 65535)"))?;
    if host.is_empty() {
        return Err(format!("'{s}': the host is missing (e.g. 127.0.0.1:{port})"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!("'{s}': write an IPv6 address in brackets, e.g. [::1]:{port}"));
    }
    Ok(s.to_string())
}

/// `--listen`: `HOST:PORT`, `[V6]:PORT` or `unix:PATH`.
fn parse_listen(s: &str) -> Result<crate::core::reactor::Endpoint, String> {
    crate::core::sock::parse_endpoint(s).map_err(|e| e.to_string())
}

/// `--listen-mode`: an octal file mode, 0 to 0777.
fn parse_mode(s: &str) -> Result<u32, String> {
    let v = u32::from_str_radix(s.trim(), 8).map_err(|_| format!("'{s}' is not an octal mode (e.g. 0660)"))?;
    if v > 0o777 {
        return Err(format!("'{s}': give a mode from 0 to 0777"));
    }
    Ok(v)
}

fn parse_workers(s: &str) -> Result<usize, String> {
    let v: i64 = s.trim().parse().map_err(|_| format!("'{s}' is not a whole number"))?;
    if !(1..=MAX_WORKERS as i64).contains(&v) {
        return Err(format!("{v} workers: give 1 to {MAX_WORKERS}"));
    }
    Ok(v as usize)
}

/// `--max-conns`: 1 to 100 million.
fn parse_max_conns(s: &str) -> Result<u64, String> {
    let v: i64 = s.trim().parse().map_err(|_| format!("'{s}' is not a whole number"))?;
    if !(1..=100_000_000).contains(&v) {
        return Err(format!("{v} connections: give 1 to 100000000"));
    }
    Ok(v as u64)
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once(',').ok_or("expected two ports: P,Q")?;
    let p = |x: &str| x.trim().parse::<u16>().map_err(|e| format!("{x}: {e}"));
    Ok((p(a)?, p(b)?))
}
