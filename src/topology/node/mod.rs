//! Node mode (seed 002, kimserver): nodes of manager + workers; a worker
//! reaches a worker on another node through that node's manager, which
//! hands it the link. The manager is the cluster master with a
//! first-frame sniff (`manager.rs`); the workers are cluster workers with
//! links to other nodes (`links.rs`); the wire format is [`wire`].
use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use crate::core::reactor::Endpoint;
use crate::core::sock;

pub mod etcd;
pub mod handover;
pub(crate) mod links;
pub(crate) mod manager;
pub(crate) mod membership;
pub mod wire;

/// One node's identity and peers (`--name`, `--peers`,
/// `--connect-timeout`): the manager runs with it (as the master's
/// `Config::node`), and its workers get it through their environment.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name.
    pub name: String,
    /// Every node's manager endpoint (TCP, or `unix:PATH` for a node on
    /// this host), this one's included (the master adds itself once its
    /// listeners are known).
    pub peers: BTreeMap<String, Endpoint>,
    /// Time from connect to the end of the tell-worker handshake.
    pub connect_timeout: Duration,
    /// `--relay-timeout`: a relay with no answer this long after it was
    /// made fails with a "timeout" error; `None`: no deadline.
    pub relay_timeout: Option<Duration>,
    /// `--heartbeat`: a link that heard nothing from its far end this long
    /// pings it, and is declared dead after [`DEAD_AFTER`] such intervals
    /// of silence; `None`: no heartbeats.
    pub heartbeat: Option<Duration>,
    /// `--etcd`, `--etcd-prefix`, `--etcd-ttl`: membership through etcd
    /// (the manager's; workers get the merged peers).
    pub etcd: Option<etcd::EtcdConfig>,
    /// `--advertise`: the address registered in etcd (default: the first
    /// TCP listener's).
    pub advertise: Option<Endpoint>,
}

/// Silent heartbeat intervals after which a link is dead.
pub const DEAD_AFTER: u32 = 3;

/// `--relay-timeout`'s default, in seconds.
pub const RELAY_TIMEOUT_SECS: f64 = 5.0;
/// `--heartbeat`'s default, in seconds.
pub const HEARTBEAT_SECS: f64 = 1.0;

/// A setting in seconds, 0 meaning off.
fn secs_or_off(s: f64) -> Option<Duration> {
    (s.is_finite() && s > 0.0).then(|| Duration::from_secs_f64(s.max(0.001)))
}

impl NodeConfig {
    /// Checks a node's name and parses its peers (`B=HOST:PORT,...`).
    pub fn new(name: &str, peers: &str, connect_timeout: f64) -> io::Result<NodeConfig> {
        if name.is_empty() || name.contains(['=', ',', ':']) || name.chars().any(char::is_whitespace) {
            let why = format!("--name '{name}': a node name is non-empty, without '=', ',', ':' or spaces");
            return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        }
        Ok(NodeConfig {
            name: name.to_string(),
            peers: parse_peers(peers)?,
            connect_timeout: Duration::from_secs_f64(connect_timeout.max(0.001)),
            relay_timeout: secs_or_off(RELAY_TIMEOUT_SECS),
            heartbeat: secs_or_off(HEARTBEAT_SECS),
            etcd: None,
            advertise: None,
        })
    }

    /// Sets `--relay-timeout` and `--heartbeat` (seconds; 0 turns either
    /// off).
    pub fn with_deadlines(mut self, relay_timeout: f64, heartbeat: f64) -> NodeConfig {
        self.relay_timeout = secs_or_off(relay_timeout);
        self.heartbeat = secs_or_off(heartbeat);
        self
    }

    /// How long a link may hear nothing from its far end before it is
    /// declared dead (`--heartbeat` times [`DEAD_AFTER`]).
    pub fn dead_after(&self) -> Option<Duration> {
        self.heartbeat.map(|h| h * DEAD_AFTER)
    }

    /// Adds `--etcd URLS` (with `--etcd-prefix` and `--etcd-ttl`) and
    /// `--advertise HOST:PORT|unix:PATH`, checked.
    pub fn with_etcd(
        mut self,
        urls: Option<&str>,
        prefix: &str,
        ttl: u64,
        advertise: Option<&str>,
    ) -> io::Result<NodeConfig> {
        if let Some(urls) = urls {
            self.etcd = Some(etcd::EtcdConfig::parse(urls, prefix, ttl)?);
        }
        if let Some(a) = advertise {
            let ep = sock::parse_endpoint(a)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("--advertise: {e}")))?;
            if matches!(&ep, Endpoint::Tcp(s) if s.ip().is_unspecified() || s.port() == 0) {
                let why = format!("--advertise {a}: give an address and port other nodes can dial");
                return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
            }
            self.advertise = Some(ep);
        }
        Ok(self)
    }
}

/// Parses `B=ADDR[,C=ADDR...]`, each ADDR `HOST:PORT`, `[V6]:PORT` (an
/// IPv6 HOST is written in brackets: `B=[::1]:7001`) or `unix:PATH` (a
/// node on this host listening there, `--listen unix:PATH`).
pub fn parse_peers(s: &str) -> io::Result<BTreeMap<String, Endpoint>> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let mut peers = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, addr) =
            item.split_once('=').ok_or_else(|| bad(format!("peer {item:?}: expected NAME=HOST:PORT")))?;
        if name.is_empty() {
            return Err(bad(format!("peer {item:?}: empty name")));
        }
        if addr.starts_with("unix:") {
            let ep = sock::parse_endpoint(addr).map_err(|e| bad(format!("peer {item:?}: {e}")))?;
            peers.insert(name.to_string(), ep);
            continue;
        }
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad(format!("peer {item:?}: expected HOST:PORT")))?;
        let port: u16 = port.parse().map_err(|e| bad(format!("peer {item:?}: port: {e}")))?;
        if name.is_empty() {
            return Err(bad(format!("peer {item:?}: empty name")));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(bad(format!("peer {item:?}: write an IPv6 address in brackets: {name}=[{host}]:{port}")));
        }
        peers.insert(name.to_string(), Endpoint::Tcp(sock::resolve(host, port)?));
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_round_trip() {
        let p = parse_peers("B=127.0.0.1:7001, C=127.0.0.1:7002").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p["C"].to_string(), "127.0.0.1:7002");
        assert!(parse_peers("B127.0.0.1:7001").is_err());
        assert!(parse_peers("B=127.0.0.1").is_err());
        assert!(parse_peers("=127.0.0.1:1").is_err());
        let cfg = NodeConfig::new("A", "B=127.0.0.1:7001,C=127.0.0.1:7002", 1.5).unwrap();
        assert_eq!(cfg.peers, p);
        assert!(NodeConfig::new("A:B", "", 1.0).is_err());
        assert!(NodeConfig::new("", "", 1.0).is_err());
    }

    #[test]
    fn ipv6_peers_in_brackets() {
        let p = parse_peers("B=[::1]:7001,C=127.0.0.1:7002").unwrap();
        assert_eq!(p["B"], Endpoint::Tcp("[::1]:7001".parse().unwrap()));
        // What a master writes in HANDOFF_NODE_PEERS reads back the same.
        let text: Vec<String> = p.iter().map(|(n, a)| format!("{n}={a}")).collect();
        assert_eq!(parse_peers(&text.join(",")).unwrap(), p);
        let e = parse_peers("B=::1:7001").unwrap_err();
        assert!(e.to_string().contains("B=[::1]:7001"), "{e}");
    }

    #[test]
    fn unix_peers_round_trip() {
        let p = parse_peers("B=unix:/run/b.sock,C=127.0.0.1:7002").unwrap();
        assert_eq!(p["B"], Endpoint::Unix("/run/b.sock".into()));
        let text: Vec<String> = p.iter().map(|(n, a)| format!("{n}={a}")).collect();
        assert_eq!(text.join(","), "B=unix:/run/b.sock,C=127.0.0.1:7002");
        assert_eq!(parse_peers(&text.join(",")).unwrap(), p);
        assert!(parse_peers("B=unix:").is_err());
    }
}
