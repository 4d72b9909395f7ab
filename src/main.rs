//! The `handoff` binary: the shared command line (`handoff::cli`) with the
//! built-in services, pingpong in pair mode and rpc in cluster and node
//! mode, plus the load clients.
use std::process::ExitCode;

use clap::{Args, Subcommand};

use handoff::cli::{self, Extra};
use handoff::client;
use handoff::service::{pingpong::PingPong, rpc::Rpc};

fn main() -> ExitCode {
    cli::main_with::<PingPong, Rpc, ClientCmd>("handoff")
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Load clients that check every response.
    #[command(subcommand)]
    Client(Client),
}

#[derive(Subcommand)]
enum Client {
    /// Pair mode: each connection sends one request at a time.
    Unary(PingArgs),
    /// Pair mode: each connection writes all requests at once, then reads.
    Stream(PingArgs),
    /// Cluster mode: JSON ping requests, checked echo.
    Rpc(RpcArgs),
    /// Cluster mode: CPU work requests on keep-alive connections (all, or
    /// those that start on one worker), and where they sit over time.
    Work(WorkArgs),
}

/// Where and how much every load client sends.
#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    to: Endpoint,
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Requests per connection (per connection slot with rpc --short).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
}

/// Where a load client connects: `--host`/`--port` (TCP) or `--unix`,
/// exactly one of `--port` and `--unix`.
#[derive(Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("endpoint").required(true).args(["port", "unix"])))]
struct Endpoint {
    /// The server's TCP port.
    #[arg(long)]
    port: Option<u16>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Connect to the Unix stream socket PATH (a server's `--listen
    /// unix:PATH`) instead of HOST:PORT.
    #[arg(long, value_name = "PATH", conflicts_with = "host")]
    unix: Option<std::path::PathBuf>,
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
struct WorkArgs {
    #[command(flatten)]
    to: Endpoint,
    /// Keep-alive connections opened (each asks whoami first).
    #[arg(long, default_value_t = 40)]
    conns: usize,
    /// Microseconds of CPU work per request.
    #[arg(long, default_value_t = 300)]
    us: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 8.0)]
    secs: f64,
    /// Drive only the connections that start on worker W (a skewed load);
    /// the others stay open and idle.
    #[arg(long, value_name = "W")]
    only_worker: Option<u64>,
    /// Write one TSV row per sample: time, work replies/s, driven
    /// connections and busy share (from /proc) per worker.
    #[arg(long, value_name = "FILE")]
    trace: Option<std::path::PathBuf>,
    /// How often each driven connection re-learns its worker (whoami
    /// between two work requests), in milliseconds; the trace's interval.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    sample_ms: u64,
}

fn parse_target(s: &str) -> Result<(String, usize), String> {
    let (n, w) = s.rsplit_once(':').ok_or("expected NODE:WORKER")?;
    Ok((n.to_string(), w.parse().map_err(|e| format!("{w}: {e}"))?))
}

impl Extra for ClientCmd {
    /// Runs a load client, prints its summary line; exit 1 on any error.
    fn run(self) -> ExitCode {
        let ClientCmd::Client(cmd) = self;
        let ping = |a: PingArgs| client::PingPongOpts {
            host: a.load.to.host,
            port: a.load.to.port.unwrap_or(0),
            conns: a.load.conns,
            requests: a.load.requests,
            size: a.size.into(),
            unix: a.load.to.unix,
        };
        let summary = match cmd {
            Client::Work(a) => {
                let s = client::work(&client::WorkOpts {
                    host: a.to.host,
                    port: a.to.port.unwrap_or(0),
                    conns: a.conns,
                    us: a.us,
                    secs: a.secs,
                    only_worker: a.only_worker,
                    trace: a.trace,
                    sample: std::time::Duration::from_millis(a.sample_ms),
                    unix: a.to.unix,
                });
                println!("{s}");
                return if s.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
            }
            Client::Unary(a) => client::unary(&ping(a)),
            Client::Stream(a) => client::stream(&ping(a)),
            Client::Rpc(a) => client::rpc(&client::RpcOpts {
                host: a.load.to.host,
                port: a.load.to.port.unwrap_or(0),
                conns: a.load.conns,
                requests: a.load.requests,
                short: a.short,
                relay: a.relay,
                unix: a.load.to.unix,
            }),
        };
        println!("{summary}");
        if summary.passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
