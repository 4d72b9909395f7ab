//! `BIN check --config FILE [--mode cluster|node|server|pair]`: validates a
//! config file as `nginx -t` does, without starting anything: the file
//! parses, every key is a flag of that command, every value is one the
//! command line takes, and what can be checked without binding holds
//! (the host resolves, `--dir` is usable, `--worker-cmd` can be run,
//! `--access-log` can be written, the service accepts its options).
//! Exit 0 with `BIN: config FILE is ok`, or 1 with the reason on stderr.
use std::ffi::OsString;
use std::io;
use std::net::ToSocketAddrs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, FromArgMatches, Subcommand, ValueEnum};

use super::{config, fail, Cli, ClusterArgs, Cmd, MasterArgs, NodeArgs, With};
use crate::service::{Place, Service};

/// The command whose settings a file holds.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Mode {
    /// `cluster` (the default).
    Cluster,
    /// `node`.
    Node,
    /// `server` (one pair-mode server).
    Server,
    /// `pair`.
    Pair,
}

#[derive(Args)]
pub(crate) struct CheckArgs {
    /// The config file to check.
    #[arg(long, value_name = "FILE")]
    config: std::path::PathBuf,
    /// The command the file is for.
    #[arg(long, value_enum, default_value = "cluster")]
    mode: Mode,
    /// More flags, as the command line that uses the file gives them
    /// (after `--`: `check --config F -- --port 8080`).
    #[arg(last = true, value_name = "FLAGS")]
    flags: Vec<OsString>,
}

/// Runs `check`.
pub(crate) fn run<P: Service, C: Service, X: Subcommand>(name: &'static str, a: CheckArgs) -> ExitCode {
    let file = a.config.display().to_string();
    let mode = a.mode.to_possible_value().map_or("cluster".into(), |v| v.get_name().to_string());
    let mut argv: Vec<OsString> = vec![name.into(), mode.into(), "--config".into(), a.config.clone().into()];
    argv.extend(a.flags.iter().cloned());
    let cmd = Cli::<P::Options, C::Options, X>::command_for(name);
    let (argv, loaded) = match config::expand(&cmd, argv) {
        Ok(x) => x,
        Err(e) => return fail(&e),
    };
    let matches = match cmd.try_get_matches_from(argv) {
        Ok(m) => m,
        Err(e) => {
            // clap's message without its usage and help hints, on one line.
            let text = e.render().to_string();
            let first = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(|l| l.trim().trim_start_matches("error: "))
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let note = loaded.as_ref().and_then(|l| l.note_for(&e, &a.flags)).unwrap_or_default();
            return fail(&format!("config {file}: {first} {note}"));
        }
    };
    let cli = match Cli::<P::Options, C::Options, X>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => return fail(&format!("config {file}: {e}")),
    };
    match validate::<P, C, X>(cli.cmd) {
        Ok(()) => {
            println!("{name}: config {file} is ok");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("config {file}: {e}")),
    }
}

/// The checks that need no socket: what would make the command fail at
/// start.
fn validate<P: Service, C: Service, X: Subcommand>(cmd: Cmd<P::Options, C::Options, X>) -> Result<(), String> {
    match cmd {
        Cmd::Server(With { args: a, options }) => {
            super::server_conflicts(a.port, a.peer_port)?;
            resolves(&a.host, a.port)?;
            usable_dir(&a.dir)?;
            P::new(&options, &Place::Test).map(drop).map_err(|e| format!("the service refuses its options: {e}"))
        }
        Cmd::Pair(With { args: a, options }) => {
            super::pair_conflicts(a.ports)?;
            resolves(&a.host, a.ports.0)?;
            usable_dir(&a.dir)?;
            P::new(&options, &Place::Test).map(drop).map_err(|e| format!("the service refuses its options: {e}"))
        }
        Cmd::Cluster(With { args: a, options }) => {
            cluster_checks(&a)?;
            C::new(&options, &Place::Test).map(drop).map_err(|e| format!("the service refuses its options: {e}"))
        }
        Cmd::Node(With { args: a, options }) => {
            node_checks(&a)?;
            C::new(&options, &Place::Test).map(drop).map_err(|e| format!("the service refuses its options: {e}"))
        }
        _ => Ok(()),
    }
}

fn cluster_checks(a: &ClusterArgs) -> Result<(), String> {
    super::cluster_conflicts(a)?;
    master_checks(&a.master)?;
    if let Some(w) = &a.worker_cmd {
        runnable(w)?;
    }
    Ok(())
}

fn node_checks(a: &NodeArgs) -> Result<(), String> {
    a.node_config().map_err(|e| e.to_string())?;
    master_checks(&a.master)
}

fn master_checks(m: &MasterArgs) -> Result<(), String> {
    resolves(&m.host, m.port.unwrap_or(0))?;
    usable_dir(&m.dir)?;
    if let Some(p) = &m.access_log {
        writable_file(p)?;
    }
    if let Some(a) = &m.metrics {
        match a.to_socket_addrs().map(|mut addrs| addrs.next()) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("--metrics {a}: no address")),
            Err(e) => return Err(format!("--metrics {a}: {e}")),
        }
    }
    Ok(())
}

/// `--host` resolves to an address.
fn resolves(host: &str, port: u16) -> Result<(), String> {
    match (host, port).to_socket_addrs() {
        Ok(a) => match a.count() {
            0 => Err(format!("--host {host}: no address")),
            _ => Ok(()),
        },
        Err(e) => Err(format!("--host {host}: {e}")),
    }
}

/// `--dir` is a directory of ours closed to others, or can be made one
/// (a missing one is created 0700 at start, with its parents).
fn usable_dir(dir: &Path) -> Result<(), String> {
    let d = dir.display();
    match std::fs::metadata(dir) {
        Ok(md) => {
            if !md.is_dir() {
                return Err(format!("--dir {d} exists and is not a directory"));
            }
            if md.uid() != crate::core::sock::euid() {
                return Err(format!("--dir {d} belongs to uid {}, not to us", md.uid()));
            }
            if md.mode() & 0o077 != 0 {
                return Err(format!(
                    "--dir {d} is open to other users (mode {:o}); it must be ours alone",
                    md.mode() & 0o777
                ));
            }
            access(dir, libc::W_OK | libc::X_OK).map_err(|e| format!("--dir {d}: {e}"))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Created at start: the nearest existing ancestor must let us.
            let absolute = std::path::absolute(dir).map_err(|e| format!("--dir {d}: {e}"))?;
            let parent = absolute.ancestors().skip(1).find(|p| p.exists()).unwrap_or(Path::new("/"));
            access(parent, libc::W_OK | libc::X_OK)
                .map_err(|e| format!("--dir {d} does not exist and cannot be created in {}: {e}", parent.display()))
        }
        Err(e) => Err(format!("--dir {d}: {e}")),
    }
}

/// `--worker-cmd` is a file we may run.
fn runnable(path: &Path) -> Result<(), String> {
    let p = path.display();
    let md = std::fs::metadata(path).map_err(|e| format!("--worker-cmd {p}: {e}"))?;
    if !md.is_file() {
        return Err(format!("--worker-cmd {p} is not a file"));
    }
    access(path, libc::X_OK).map_err(|e| format!("--worker-cmd {p} cannot be run: {e}"))
}

/// `--access-log` can be appended to (or created).
fn writable_file(path: &Path) -> Result<(), String> {
    let p = path.display();
    match std::fs::metadata(path) {
        Ok(md) if md.is_dir() => Err(format!("--access-log {p} is a directory")),
        Ok(_) => access(path, libc::W_OK).map_err(|e| format!("--access-log {p}: {e}")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            access(parent, libc::W_OK | libc::X_OK).map_err(|e| format!("--access-log {p}: cannot create it: {e}"))
        }
        Err(e) => Err(format!("--access-log {p}: {e}")),
    }
}

/// access(2): whether this process may use `path` as `mode` says.
fn access(path: &Path, mode: i32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: c is a live NUL-terminated string; access only reads it.
    if unsafe { libc::access(c.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
