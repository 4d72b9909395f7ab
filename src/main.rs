//! The `handoff` binary: parses the command line, sets up logging and
//! runs one mode. Everything else lives in the library.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use log::LevelFilter;

use handoff::{client, cluster, pair};

#[derive(Parser)]
#[command(name = "handoff", version, about = "Move live TCP connections between processes (SCM_RIGHTS)")]
struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log level: off, error, warn, info, debug, trace (overrides -v).
    #[arg(long, global = true, value_name = "L")]
    log_level: Option<LevelFilter>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One pair-mode server: answers a request, hands the connection to its peer.
    Server(ServerArgs),
    /// Runs both servers of a pair (two processes) until SIGINT/SIGTERM.
    Pair(PairArgs),
    /// Cluster master: accepts and hands each connection to a prefork worker.
    Cluster(ClusterArgs),
    /// A node (manager + workers) whose workers relay to other nodes' workers.
    Node(NodeArgs),
    /// Prints a running master's per-worker table.
    Status(StatusArgs),
    /// Hot restart: a new master takes over the listener and every live
    /// connection; exits 0 once the new generation has committed and answered.
    Restart(RestartArgs),
    /// The new master of a restart (started by the old one).
    #[command(hide = true)]
    Takeover(TakeoverArgs),
    /// A cluster worker (started by the master, not by hand).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Load clients that check every response.
    #[command(subcommand)]
    Client(ClientCmd),
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Pair mode: each connection sends one request at a time.
    Unary(PingArgs),
    /// Pair mode: each connection writes all requests at once, then reads.
    Stream(PingArgs),
    /// Cluster mode: JSON ping requests, checked echo.
    Rpc(RpcArgs),
}

/// Where and how much every load client sends.
#[derive(Args)]
struct LoadArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Requests per connection (per connection slot with rpc --short).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
}

#[derive(Args)]
struct PingArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Payload bytes per request (0..=255).
    #[arg(long, default_value_t = 16)]
    size: u8,
}

#[derive(Args)]
struct RpcArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// One new connection per request (exercises accept + handoff).
    #[arg(long)]
    short: bool,
    /// Node mode: relay to NODE:WORKER instead of pinging.
    #[arg(long, value_name = "NODE:WORKER", value_parser = parse_target)]
    relay: Option<(String, usize)>,
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
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
}

#[derive(Args)]
struct PairArgs {
    /// The two ports, comma separated.
    #[arg(long, default_value = "7000,7001", value_parser = parse_ports)]
    ports: (u16, u16),
    #[arg(long, default_value = "run")]
    dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
}

/// What a cluster master and a node manager both take.
#[derive(Args)]
struct MasterArgs {
    /// TCP port to listen on (0 picks a free one; see the ready line).
    #[arg(long)]
    port: u16,
    /// Number of workers, 1 to 1024 (default: number of CPUs).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_workers)]
    workers: Option<usize>,
    /// Directory for the control socket (made 0700).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Largest request frame; a larger one closes that connection.
    #[arg(long, default_value_t = handoff::proto::rpc::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Kill and respawn a worker that has not answered the master's
    /// heartbeat for this many seconds (default: only stop giving it
    /// connections while it is silent).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_secs)]
    hang_timeout: Option<f64>,
}

impl MasterArgs {
    fn config(
        self,
        policy: cluster::Policy,
        grace: f64,
        log_args: Vec<String>,
    ) -> std::io::Result<cluster::master::Config> {
        Ok(cluster::master::Config {
            host: self.host,
            port: self.port,
            workers: self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            dir: self.dir,
            policy,
            max_frame: self.max_frame,
            grace: std::time::Duration::from_secs_f64(grace.max(0.0)),
            exe: std::env::current_exe()?,
            log_args,
            gen: 1,
            node: None,
            hang_timeout: self.hang_timeout.map(std::time::Duration::from_secs_f64),
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
}

#[derive(Args)]
struct NodeArgs {
    /// This node's name.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    master: MasterArgs,
    /// Other nodes: B=HOST:PORT[,C=HOST:PORT...].
    #[arg(long, default_value = "")]
    peers: String,
    /// Seconds from connect to the end of the link handshake (0 to 86400).
    #[arg(long, default_value_t = 1.5, allow_hyphen_values = true, value_parser = parse_secs)]
    connect_timeout: f64,
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

#[derive(Args)]
struct WorkerArgs {
    #[arg(long)]
    index: usize,
    #[arg(long, default_value_t = 1)]
    gen: u64,
    #[arg(long)]
    max_frame: usize,
    /// The inherited descriptor of the master channel.
    #[arg(long)]
    channel_fd: i32,
    /// The cluster's directory: where a successor master listens, should
    /// this worker's master die during a restart.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Node mode: this node's name (with --peers, --connect-timeout).
    #[arg(long)]
    node: Option<String>,
    #[arg(long, default_value = "")]
    peers: String,
    #[arg(long, default_value_t = 1.5)]
    connect_timeout: f64,
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

fn parse_workers(s: &str) -> Result<usize, String> {
    let v: i64 = s.trim().parse().map_err(|_| format!("'{s}' is not a whole number"))?;
    if !(1..=MAX_WORKERS as i64).contains(&v) {
        return Err(format!("{v} workers: give 1 to {MAX_WORKERS}"));
    }
    Ok(v as usize)
}

fn parse_target(s: &str) -> Result<(String, usize), String> {
    let (n, w) = s.rsplit_once(':').ok_or("expected NODE:WORKER")?;
    Ok((n.to_string(), w.parse().map_err(|e| format!("{w}: {e}"))?))
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once(',').ok_or("expected two ports: P,Q")?;
    let p = |x: &str| x.trim().parse::<u16>().map_err(|e| format!("{x}: {e}"));
    Ok((p(a)?, p(b)?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    handoff::logging::init(cli.verbose, cli.log_level);
    let log_args: Vec<String> = match cli.log_level {
        Some(l) => vec!["--log-level".into(), l.to_string()],
        None => (0..cli.verbose).map(|_| "-v".to_string()).collect(),
    };
    // One-shot commands print errors plainly; servers log them.
    let one_shot = matches!(cli.cmd, Cmd::Status(_) | Cmd::Restart(_));
    let result = match cli.cmd {
        Cmd::Server(a) => {
            if a.port == a.peer_port {
                return fail(&format!(
                    "--port and --peer-port are both {}: a server cannot hand connections to itself",
                    a.port
                ));
            }
            pair::server::run(&pair::server::Config { host: a.host, port: a.port, peer_port: a.peer_port, dir: a.dir })
        }
        Cmd::Pair(a) => {
            if a.ports.0 == a.ports.1 {
                return fail(&format!("--ports {0},{0}: the two servers need two different ports", a.ports.0));
            }
            std::env::current_exe().and_then(|exe| pair::launcher::run(&exe, a.ports, &a.dir, &a.host, &log_args))
        }
        Cmd::Client(c) => return run_client(c),
        Cmd::Cluster(a) => a.master.config(a.policy, a.grace, log_args).and_then(cluster::master::run),
        Cmd::Node(a) => node_config(&a.name, &a.peers, a.connect_timeout).and_then(|node| {
            let mut cfg = a.master.config(cluster::Policy::RoundRobin, 5.0, log_args)?;
            cfg.node = Some(node);
            cluster::master::run(cfg)
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
        Cmd::Worker(a) => inherited_fd(a.channel_fd).and_then(|channel| {
            let node = match &a.node {
                Some(name) => Some(node_config(name, &a.peers, a.connect_timeout)?),
                None => None,
            };
            cluster::worker::run(cluster::worker::Config {
                node,
                index: a.index,
                gen: a.gen,
                max_frame: a.max_frame,
                channel,
                dir: a.dir,
            })
        }),
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

/// A command's error on stderr, exit 1.
fn fail(msg: &str) -> ExitCode {
    eprintln!("handoff: error: {msg}");
    ExitCode::FAILURE
}

/// Runs a load client, prints its summary line; exit 1 on any error.
fn run_client(cmd: ClientCmd) -> ExitCode {
    let ping = |a: PingArgs| client::PingPongOpts {
        host: a.load.host,
        port: a.load.port,
        conns: a.load.conns,
        requests: a.load.requests,
        size: a.size.into(),
    };
    let summary = match cmd {
        ClientCmd::Unary(a) => client::unary(&ping(a)),
        ClientCmd::Stream(a) => client::stream(&ping(a)),
        ClientCmd::Rpc(a) => client::rpc(&client::RpcOpts {
            host: a.load.host,
            port: a.load.port,
            conns: a.load.conns,
            requests: a.load.requests,
            short: a.short,
            relay: a.relay,
        }),
    };
    println!("{summary}");
    if summary.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Takes ownership of a descriptor inherited across exec.
fn inherited_fd(fd: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl(F_GETFD) only checks that the descriptor is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::other(format!("--channel-fd {fd} is not an inherited descriptor")));
    }
    // SAFETY: the master set this descriptor up for us alone; nothing else
    // in this process refers to it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn node_config(name: &str, peers: &str, timeout: f64) -> std::io::Result<handoff::node::NodeConfig> {
    if name.is_empty() || name.contains(['=', ',', ':']) || name.chars().any(char::is_whitespace) {
        let why = format!("--name '{name}': a node name is non-empty, without '=', ',', ':' or spaces");
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, why));
    }
    Ok(handoff::node::NodeConfig {
        name: name.to_string(),
        peers: handoff::node::parse_peers(peers)?,
        connect_timeout: std::time::Duration::from_secs_f64(timeout.max(0.001)),
    })
}
