//! The `handoff` binary: parses the command line, sets up logging and
//! runs one mode. Everything else lives in the library.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use log::LevelFilter;

use handoff::{client, pair};

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

#[derive(Args)]
struct PingArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Requests per connection.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Payload bytes per request (0..=255).
    #[arg(long, default_value_t = 16)]
    size: u8,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
}

#[derive(Args)]
struct RpcArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Requests per connection (per connection slot with --short).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// One new connection per request (exercises accept + handoff).
    #[arg(long)]
    short: bool,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
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
    let result = match cli.cmd {
        Cmd::Server(a) => pair::server::run(&pair::server::Config { host: a.host, port: a.port, peer_port: a.peer_port, dir: a.dir }),
        Cmd::Pair(a) => std::env::current_exe().and_then(|exe| pair::launcher::run(&exe, a.ports, &a.dir, &a.host, &log_args)),
        Cmd::Client(c) => return run_client(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a load client, prints its summary line; exit 1 on any error.
fn run_client(cmd: ClientCmd) -> ExitCode {
    let ping = |a: PingArgs| client::PingPongOpts { host: a.host, port: a.port, conns: a.conns, requests: a.requests, size: a.size.into() };
    let summary = match cmd {
        ClientCmd::Unary(a) => client::unary(&ping(a)),
        ClientCmd::Stream(a) => client::stream(&ping(a)),
        ClientCmd::Rpc(a) => client::rpc(&client::RpcOpts { host: a.host, port: a.port, conns: a.conns, requests: a.requests, short: a.short }),
    };
    println!("{summary}");
    if summary.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
