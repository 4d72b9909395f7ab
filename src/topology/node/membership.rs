//! A node's membership: the nodes its workers may relay to. Two sources,
//! merged: `--peers` (fixed at start) and etcd (`--etcd`, live; see
//! [`super::etcd`]). A node named in both is reached at etcd's address.
//! The manager keeps the merged list in `Config::node.peers` (so respawned
//! workers get it in `HANDOFF_NODE_PEERS`) and sends it to every worker at
//! each change (`KIND_NODE_PEERS`); a relay to a node not in it fails at
//! once with "node X unreachable: not a member".
//!
//! `handoff status` shows it:
//!
//! ```json
//! "members": [{"name": "A", "addr": "127.0.0.1:7000", "source": "self"},
//!             {"name": "B", "addr": "127.0.0.1:7001", "source": "etcd"}],
//! "etcd": {"endpoints": ["http://127.0.0.1:2379"], "endpoint": "http://127.0.0.1:2379",
//!          "state": "connected", "lease": 7587..., "prefix": "/handoff/nodes/",
//!          "key": "/handoff/nodes/A", "ttl": 10, "advertise": "127.0.0.1:7000", "error": null}
//! ```
//!
//! `source` is `self`, `peers`, `etcd` or `both`; `etcd` is `null` without
//! `--etcd`, and its `state` is `connecting`, `connected`, `unreachable`
//! or `stopped`.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use serde_json::{json, Value};

use super::etcd::{Etcd, Members};
use crate::core::channel::Msg;
use crate::core::reactor::Endpoint;
use crate::core::sock;
use crate::topology::cluster::master::{with, Master};
use crate::topology::cluster::KIND_NODE_PEERS;

/// The manager's view of membership.
pub(crate) struct Membership {
    /// `--peers`, as given.
    peers: BTreeMap<String, Endpoint>,
    /// What etcd last showed (parsed addresses).
    from_etcd: BTreeMap<String, Endpoint>,
    etcd: Option<Rc<RefCell<Etcd>>>,
}

/// The peers as `HANDOFF_NODE_PEERS` and `KIND_NODE_PEERS` carry them:
/// `A=ADDR,B=ADDR`.
pub fn peers_text(peers: &BTreeMap<String, Endpoint>) -> String {
    peers.iter().map(|(n, a)| format!("{n}={a}")).collect::<Vec<_>>().join(",")
}

/// Starts a node's membership (after its listeners are known, the node's
/// own entry already in its peers): registers it in etcd if `--etcd`.
pub(crate) fn start(master: &Rc<RefCell<Master>>) -> io::Result<()> {
    let mut m = master.borrow_mut();
    let Some(node) = m.cfg.node.clone() else { return Ok(()) };
    let mut peers = node.peers.clone();
    let own = peers.remove(&node.name);
    let etcd = match &node.etcd {
        None => None,
        Some(cfg) => {
            let advertise = match (&node.advertise, m.endpoints.iter().find(|e| matches!(e, Endpoint::Tcp(_)))) {
                (Some(a), _) => a.clone(),
                (None, Some(Endpoint::Tcp(a))) if a.ip().is_unspecified() => {
                    log::warn!(
                        "etcd: the node listens on {a}, which other hosts cannot dial; advertising loopback \
                         (give --advertise HOST:PORT)"
                    );
                    crate::topology::cluster::master::reachable(&Endpoint::Tcp(*a))
                }
                (None, Some(first)) => first.clone(),
                (None, None) => own.clone().unwrap_or_else(|| m.endpoints[0].clone()),
            };
            let w = m.me.clone();
            let on_change = move |members: Members| with(&w, |m| m.on_etcd_members(members));
            Some(Etcd::start(&m.base, cfg.clone(), &node.name, &advertise.to_string(), on_change))
        }
    };
    m.membership = Some(Membership { peers, from_etcd: BTreeMap::new(), etcd });
    Ok(())
}

/// After the master's loop ended: lets a leave's deletion reach etcd (1 s
/// at most).
pub(crate) fn finish(master: &Rc<RefCell<Master>>) {
    let etcd = master.borrow().membership.as_ref().and_then(|ms| ms.etcd.clone());
    if let Some(e) = etcd {
        let base = master.borrow().base.clone();
        super::etcd::finish_leave(&base, &e, Duration::from_secs(1));
    }
}

impl Master {
    /// Etcd's membership changed: merge, and tell the workers if the
    /// merged list changed.
    pub(crate) fn on_etcd_members(&mut self, members: Members) {
        let Some(ms) = self.membership.as_mut() else { return };
        ms.from_etcd.clear();
        for (name, addr) in members {
            if addr.contains(',') {
                crate::warn_limited!("etcd: node {name}: bad address {addr:?}; ignored");
                continue;
            }
            match sock::parse_endpoint(&addr) {
                Ok(ep) => {
                    ms.from_etcd.insert(name, ep);
                }
                Err(e) => crate::warn_limited!("etcd: node {name}: {e}; ignored"),
            }
        }
        let Some(node) = self.cfg.node.as_mut() else { return };
        let mut merged = ms.peers.clone();
        merged.extend(ms.from_etcd.iter().map(|(n, a)| (n.clone(), a.clone())));
        if let Some(own) = node.peers.get(&node.name) {
            merged.insert(node.name.clone(), own.clone());
        }
        if merged == node.peers {
            return;
        }
        node.peers = merged;
        let text = peers_text(&node.peers);
        log::info!("membership: {text}");
        for slot in &self.slots {
            if let Some(c) = &slot.channel {
                let _ = c.send(Msg::control(KIND_NODE_PEERS, text.clone().into_bytes()));
            }
        }
    }

    /// A clean stop (TERM, INT, QUIT, the supervisor gone): the node leaves etcd (its
    /// key deleted, its lease revoked).
    pub(crate) fn leave_membership(&mut self) {
        if let Some(e) = self.membership.as_ref().and_then(|ms| ms.etcd.as_ref()) {
            e.borrow_mut().leave();
        }
    }

    /// This master exits because a successor took over (node restart): the
    /// key stays (the successor put it on its own lease).
    pub(crate) fn handover_membership(&mut self) {
        if let Some(e) = self.membership.as_ref().and_then(|ms| ms.etcd.as_ref()) {
            e.borrow_mut().handover();
        }
    }

    /// The peers a successor started by `handoff takeover` gets: `--peers`
    /// as given (etcd's members it learns itself), this node left out.
    pub(crate) fn static_peers_text(&self) -> String {
        match (&self.membership, &self.cfg.node) {
            (Some(ms), _) => peers_text(&ms.peers),
            (None, Some(n)) => {
                let mut p = n.peers.clone();
                p.remove(&n.name);
                peers_text(&p)
            }
            (None, None) => String::new(),
        }
    }

    /// Adds `members` and `etcd` to the status JSON.
    pub(crate) fn membership_status(&self, v: &mut Value) {
        let (Some(node), Some(ms)) = (self.cfg.node.as_ref(), self.membership.as_ref()) else { return };
        let members: Vec<Value> = node
            .peers
            .iter()
            .map(|(name, addr)| {
                let source = match (name == &node.name, ms.peers.contains_key(name), ms.from_etcd.contains_key(name)) {
                    (true, _, _) => "self",
                    (false, true, true) => "both",
                    (false, false, true) => "etcd",
                    _ => "peers",
                };
                json!({"name": name, "addr": addr.to_string(), "source": source})
            })
            .collect();
        v["members"] = Value::Array(members);
        v["etcd"] = ms.etcd.as_ref().map_or(Value::Null, |e| e.borrow().status());
    }
}

/// The status text's membership lines (node mode): one per member, and
/// etcd's state.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    if let Some(members) = v["members"].as_array() {
        out.push_str("members:\n");
        for m in members {
            out.push_str(&format!(
                "  {} {} ({})\n",
                m["name"].as_str().unwrap_or("?"),
                m["addr"].as_str().unwrap_or("?"),
                m["source"].as_str().unwrap_or("?")
            ));
        }
    }
    let e = &v["etcd"];
    if e.is_object() {
        let list =
            |k: &str| e[k].as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>().join(",");
        out.push_str(&format!(
            "etcd {} {}: key {} lease {} ttl {}s{}\n",
            list("endpoints"),
            e["state"].as_str().unwrap_or("?"),
            e["key"].as_str().unwrap_or("?"),
            e["lease"],
            e["ttl"],
            e["error"].as_str().map_or(String::new(), |x| format!(" (last error: {x})"))
        ));
    }
    out
}
