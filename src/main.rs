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

fn parse_target(s: &str) -> Result<(String, usize), String> {
    let (n, w) = s.rsplit_once(':').ok_or("expected NODE:WORKER")?;
    Ok((n.to_string(), w.parse().map_err(|e| format!("{w}: {e}"))?))
}

impl Extra for ClientCmd {
    /// Runs a load client, prints its summary line; exit 1 on any error.
    fn run(self) -> ExitCode {
        let ClientCmd::Client(cmd) = self;
        let ping = |a: PingArgs| client::PingPongOpts {
            host: a.load.host,
            port: a.load.port,
            conns: a.load.conns,
            requests: a.load.requests,
            size: a.size.into(),
        };
        let summary = match cmd {
            Client::Unary(a) => client::unary(&ping(a)),
            Client::Stream(a) => client::stream(&ping(a)),
            Client::Rpc(a) => client::rpc(&client::RpcOpts {
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
}
