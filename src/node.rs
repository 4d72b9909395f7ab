//! Node mode (seed 002, kimserver): nodes of manager + workers; a worker
//! reaches a worker on another node through that node's manager, which
//! hands it the link. The manager is the cluster master (`cluster::master`)
//! with a first-frame sniff; the workers are cluster workers with links
//! (`cluster::worker::links`); the wire format is `proto::node`.
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddrV4;
use std::time::Duration;

use crate::sock;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name.
    pub name: String,
    /// Every node's manager address, this one's included (the master adds
    /// itself once its port is known).
    pub peers: BTreeMap<String, SocketAddrV4>,
    /// Time from connect to the end of the tell-worker handshake.
    pub connect_timeout: Duration,
}

impl NodeConfig {
    /// Arguments that give a worker the same config.
    pub fn to_args(&self) -> Vec<String> {
        let peers: Vec<String> = self.peers.iter().map(|(n, a)| format!("{n}={a}")).collect();
        vec![
            "--node".into(),
            self.name.clone(),
            "--peers".into(),
            peers.join(","),
            "--connect-timeout".into(),
            self.connect_timeout.as_secs_f64().to_string(),
        ]
    }
}

/// Parses `B=HOST:PORT[,C=HOST:PORT...]`.
pub fn parse_peers(s: &str) -> io::Result<BTreeMap<String, SocketAddrV4>> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let mut peers = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, addr) =
            item.split_once('=').ok_or_else(|| bad(format!("peer {item:?}: expected NAME=HOST:PORT")))?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad(format!("peer {item:?}: expected HOST:PORT")))?;
        let port: u16 = port.parse().map_err(|e| bad(format!("peer {item:?}: port: {e}")))?;
        if name.is_empty() {
            return Err(bad(format!("peer {item:?}: empty name")));
        }
        peers.insert(name.to_string(), sock::resolve_v4(host, port)?);
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
        assert_eq!(p["C"].port(), 7002);
        assert!(parse_peers("B127.0.0.1:7001").is_err());
        assert!(parse_peers("B=127.0.0.1").is_err());
        assert!(parse_peers("=127.0.0.1:1").is_err());
        let cfg = NodeConfig { name: "A".into(), peers: p, connect_timeout: Duration::from_millis(1500) };
        let args = cfg.to_args();
        assert_eq!(parse_peers(&args[3]).unwrap(), cfg.peers);
        assert_eq!(args[5], "1.5");
    }
}
