//! Node restart: `handoff restart` on a node keeps it a node. Clients
//! move as in cluster mode; links move too, with their unread bytes and
//! (ours) their sequence numbers; relays in flight complete.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster_support::*;
use crate::support::*;

/// The link rows of every worker of `v` (a node's status) to `node`.
fn links_to(v: &Value, node: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    for w in v["workers"].as_array().into_iter().flatten() {
        for l in w["links"].as_array().into_iter().flatten().filter(|l| l["node"] == node) {
            rows.push(l.clone());
        }
    }
    rows
}

#[test]
fn a_restarted_node_stays_a_node_and_its_links_move() {
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut ca = a.conn_on(0);
    for w in 0..2 {
        let m = json!({"before": w});
        assert_relayed(&ca.call(&relay_req("B", w, &m)), "B", w, &m);
    }

    // B restarts: the links A's worker 0 holds to B:0 and B:1 end up in
    // B's new workers, and go on answering, on the same connections.
    let (gen, _) = b.c.restart_ok();
    assert_eq!(gen, 2);
    let new_b = b.c.worker_pids();
    let mut cb = b.c.connect();
    let who = cb.whoami();
    assert_eq!((who["node"].as_str(), who["gen"].as_u64()), (Some("B"), Some(2)), "{who}");
    for (w, &pid) in new_b.iter().enumerate() {
        let m = json!({"after B's restart": w});
        assert_eq!(assert_relayed(&ca.call(&relay_req("B", w, &m)), "B", w, &m), pid as u64);
    }
    ca.ping(&json!("stats"));
    let v = a.c.wait_status("A's links to B acked twice", STATS_TIMEOUT, |v| {
        let rows = links_to(v, "B");
        rows.len() == 2 && rows.iter().all(|l| l["acked"] == json!(2))
    });
    for l in links_to(&v, "B") {
        assert_eq!(
            (l["connects"].as_u64(), l["failures"].as_u64(), l["state"].as_str()),
            (Some(1), Some(0), Some("up")),
            "the link was moved, not rebuilt: {l}"
        );
    }

    // A restarts: the client moves (round-robin, to either new worker),
    // and its worker's links to B move to worker 0 of the new generation
    // (a link keeps its worker index), which has counted no connect.
    let (gen, _) = a.c.restart_ok();
    assert_eq!(gen, 2);
    let who = ca.whoami();
    assert_eq!((who["node"].as_str(), who["gen"].as_u64()), (Some("A"), Some(2)), "{who}");
    for w in 0..2 {
        let m = json!({"after A's restart": w});
        assert_relayed(&ca.call(&relay_req("B", w, &m)), "B", w, &m);
    }
    let mut on0 = a.conn_on(0);
    for w in 0..2 {
        let m = json!({"from A's new worker 0": w});
        assert_relayed(&on0.call(&relay_req("B", w, &m)), "B", w, &m);
    }
    on0.ping(&json!("stats"));
    let v = a.c.wait_status("the moved links in A's new worker 0", STATS_TIMEOUT, |v| {
        v["workers"][0]["links"]
            .as_array()
            .is_some_and(|l| l.iter().filter(|x| x["acked"].as_u64() >= Some(1)).count() == 2)
    });
    for w in 0..2 {
        let l = Node::link(&v, 0, "B", w).unwrap_or_else(|| panic!("no link to B:{w}: {v}"));
        assert_eq!(l["connects"], json!(0), "moved, not reconnected: {l}");
        assert_eq!(l["state"], "up", "{l}");
    }
    // And B can still reach A's new workers.
    let a_pids = a.c.worker_pids();
    for (w, &pid) in a_pids.iter().enumerate() {
        let m = json!({"B to A": w});
        assert_eq!(assert_relayed(&cb.call(&relay_req("A", w, &m)), "A", w, &m), pid as u64);
    }
}

/// Relay load from A's clients to both of B's workers, without pause,
/// while B restarts, then A: not one relay fails, and every answer is the
/// one asked for.
#[test]
fn relays_go_on_through_restarts_of_either_node() {
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let port = a.c.port;
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || -> Result<u64, String> {
                let mut c = Rpc::try_connect(port).map_err(|e| e.to_string())?;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let w = (n as usize + i) % 2;
                    let m = json!({"client": i, "n": n});
                    let r = c.call(&relay_req("B", w, &m));
                    if r["out"] != "relayed" || r["result"]["msg"] != m || r["result"]["worker"] != json!(w) {
                        return Err(format!("client {i}, relay {n} to B:{w}: {r}"));
                    }
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n)
            })
        })
        .collect();
    let wait_progress = |what: &str| {
        let from = done.load(Ordering::Relaxed);
        assert!(
            poll_until(Duration::from_secs(10), || done.load(Ordering::Relaxed) >= from + 200),
            "relays stalled {what}"
        );
    };
    wait_progress("at the start");
    for round in 0..3 {
        b.c.restart_ok();
        wait_progress(&format!("after B's restart {round}"));
    }
    for round in 0..3 {
        a.c.restart_ok();
        wait_progress(&format!("after A's restart {round}"));
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.join().expect("client thread").unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(total >= 1400, "{total} relays");
}
