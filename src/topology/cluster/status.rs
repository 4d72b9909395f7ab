//! `handoff status`: asks a running master over its control socket.
use std::io;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::control::Client;
use super::{KIND_STATUS_REPLY, KIND_STATUS_REQ};

/// Fetches the status JSON of the master running in `dir`.
pub fn fetch(dir: &Path, timeout: Duration) -> io::Result<Value> {
    let mut c = Client::connect(dir)?;
    c.send(KIND_STATUS_REQ, &[])?;
    let (body, _) = c.recv(KIND_STATUS_REPLY, timeout)?;
    serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The human-readable table.
pub fn render(v: &Value) -> String {
    // The descriptor budget, when the master tells it (see core::limits).
    let capacity = match v["capacity"].as_u64() {
        Some(cap) => format!("  capacity {cap} connections (descriptor limit {})", v["nofile"]),
        None => String::new(),
    };
    let mut out = format!(
        "{} master pid {}  generation {}  started {}  port {}  policy {}{}  pending {}{capacity}\n",
        v["mode"].as_str().unwrap_or("?"),
        v["pid"],
        v["gen"],
        v["started"],
        v["port"],
        v["policy"].as_str().unwrap_or("?"),
        if v["rebalance"] == Value::Bool(true) { " (rebalancing)" } else { "" },
        v["pending"]
    );
    // More than the port to say: every endpoint.
    let listen: Vec<&str> = v["listen"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if listen.len() > 1 || listen.iter().any(|e| e.starts_with("unix:")) {
        out.push_str(&format!("listening on {}\n", listen.join(", ")));
    }
    if v["accepting"] == Value::Bool(false) && v["restarting"] != Value::Bool(true) {
        out.push_str("not accepting: no worker can serve (new clients wait in the kernel backlog)\n");
    }
    if let Some(max) = v["max_conns"].as_u64() {
        let full =
            if v["at_limit"] == Value::Bool(true) { ": full, new clients wait in the kernel backlog" } else { "" };
        out.push_str(&format!("open connections {} of --max-conns {max}{full}\n", v["open"]));
    }
    out.push_str(&crate::topology::node::membership::render(v));
    out.push_str(&format!(
        "{:>6} {:>8} {:>10} {:>8} {:>10} {:>8} {:>8} {:>6} {:>8} {:>9}\n",
        "worker", "pid", "handed", "open", "served", "respawns", "state", "busy%", "moved in", "moved out"
    ));
    for w in v["workers"].as_array().into_iter().flatten() {
        let f = |k: &str| w[k].to_string();
        out.push_str(&format!(
            "{:>6} {:>8} {:>10} {:>8} {:>10} {:>8} {:>8} {:>6.0} {:>8} {:>9}\n",
            f("worker"),
            f("pid"),
            f("handed"),
            f("open"),
            f("served"),
            f("respawns"),
            w["state"].as_str().unwrap_or("?"),
            w["busy"].as_f64().unwrap_or(0.0) * 100.0,
            f("moved_in"),
            f("moved_out")
        ));
    }
    let links: Vec<(&Value, &Value)> = v["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["links"].as_array().into_iter().flatten().map(move |l| (&w["worker"], l)))
        .collect();
    if !links.is_empty() {
        out.push_str(&format!(
            "links:\n{:>6} {:>10} {:>11} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}\n",
            "worker", "peer", "state", "sent", "acked", "connects", "failures", "setup_us", "timeouts"
        ));
        for (w, l) in links {
            let peer = format!("{}:{}", l["node"].as_str().unwrap_or("?"), l["worker"]);
            out.push_str(&format!(
                "{:>6} {:>10} {:>11} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}\n",
                w.to_string(),
                peer,
                l["state"].as_str().unwrap_or("?"),
                l["sent"].to_string(),
                l["acked"].to_string(),
                l["connects"].to_string(),
                l["failures"].to_string(),
                l["setup_us"].to_string(),
                l["timeouts"].as_u64().unwrap_or(0)
            ));
        }
    }
    out
}
