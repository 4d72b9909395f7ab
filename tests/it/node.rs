//! Node mode: workers on different nodes talk through links that the
//! remote manager hands to the addressed worker.
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddrV4, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_support::*;
use crate::support::*;

#[test]
fn relay_both_ways_between_two_nodes() {
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let a_pids = a.c.worker_pids();
    let b_pids = b.c.worker_pids();

    let mut ca = a.c.connect();
    let who = ca.whoami();
    assert_eq!(who["node"], "A", "{who}");
    assert_eq!(who["gen"], json!(1));
    let msg = json!({"hello": "from A", "n": [1, 2.5, null], "ü": "✓"});
    let r = ca.call(&relay_req("B", 1, &msg));
    let pid = assert_relayed(&r, "B", 1, &msg);
    assert_eq!(pid, b_pids[1] as u64, "relay answered by B's worker 1");
    ca.ping(&json!("still a cluster client"));

    let mut cb = b.c.connect();
    assert_eq!(cb.whoami()["node"], "B");
    for (w, &pid) in a_pids.iter().enumerate() {
        let m = json!({"from": "B", "to": w});
        let r = cb.call(&relay_req("A", w, &m));
        assert_eq!(assert_relayed(&r, "A", w, &m), pid as u64);
    }
    // Unknown node and worker, and a malformed relay: error replies.
    let r = ca.call(&relay_req("Z", 0, &json!(1)));
    assert_eq!(r["out"], "error", "{r}");
    let r = ca.call(&relay_req("B", 7, &json!(1)));
    assert_eq!(r["out"], "error", "relay to a worker B does not have: {r}");
    let r = ca.call(&json!({"in": "relay", "params": {"node": "B"}}));
    assert_eq!(r["out"], "error", "{r}");
    let r = ca.call(&relay_req("B", 0, &json!("fine")));
    assert_relayed(&r, "B", 0, &json!("fine"));
}

#[test]
fn relays_between_all_pairs_of_three_nodes() {
    let names = ["A", "B", "C"];
    let nodes = start_nodes(&names, 2, &[]);
    let pids: HashMap<&str, Vec<i32>> = nodes.iter().map(|n| (n.name.as_str(), n.c.worker_pids())).collect();
    for src in &nodes {
        for sw in 0..2 {
            let mut conn = src.conn_on(sw);
            for dst in &names {
                for (dw, &want) in pids[dst].iter().enumerate() {
                    let m = json!({"from": [src.name, sw], "to": [dst, dw]});
                    let r = conn.call(&relay_req(dst, dw, &m));
                    let pid = assert_relayed(&r, dst, dw, &m);
                    assert_eq!(pid, want as u64, "{}:{sw} -> {dst}:{dw}", src.name);
                }
            }
            // A client request makes the worker send stats; an ACK alone
            // does not (see relays_served_by_the_remote_worker_show_in_its_status).
            conn.ping(&json!("stats"));
        }
    }
    // Every source worker has one link to each of the 6 far workers.
    for src in &nodes {
        let v = src.c.wait_status("the link table", STATS_TIMEOUT, |v| {
            (0..2).all(|w| {
                v["workers"][w]["links"]
                    .as_array()
                    .is_some_and(|l| l.len() == 6 && l.iter().all(|x| x["acked"] == json!(1)))
            })
        });
        for w in 0..2 {
            for dst in &names {
                for dw in 0..2 {
                    let l = Node::link(&v, w, dst, dw)
                        .unwrap_or_else(|| panic!("no link {}:{w} -> {dst}:{dw}: {v}", src.name));
                    assert_eq!(
                        (l["sent"].as_u64(), l["connects"].as_u64(), l["failures"].as_u64()),
                        (Some(1), Some(1), Some(0)),
                        "{l}"
                    );
                    assert_eq!(l["state"], "up", "{l}");
                }
            }
        }
    }
}

#[test]
fn thousand_pipelined_relays_arrive_in_order() {
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let b_pids = nodes[1].c.worker_pids();
    let mut conn = nodes[0].c.connect();
    let mut w = conn.s.try_clone().unwrap();
    // Relays to both of B's workers, with a ping every 50th request: a
    // ping's reply must wait behind the relays before it.
    let req = |i: usize| -> Value {
        if i % 50 == 49 {
            ping_req(&json!({"ping": i}))
        } else {
            relay_req("B", i % 2, &json!({"i": i}))
        }
    };
    let writer = std::thread::spawn(move || {
        let mut all = Vec::new();
        for i in 0..1000 {
            all.extend(frame(&req(i)));
        }
        w.write_all(&all).unwrap();
    });
    for i in 0..1000 {
        let r = conn.recv();
        if i % 50 == 49 {
            assert_eq!(r, json!({"out": "pong", "result": {"ping": i}}), "reply {i}");
        } else {
            let pid = assert_relayed(&r, "B", i % 2, &json!({"i": i}));
            assert_eq!(pid, b_pids[i % 2] as u64);
        }
    }
    writer.join().unwrap();
    assert!(conn.nothing_pending(Duration::from_millis(100)), "extra replies");
}

#[test]
fn relay_to_a_node_that_is_down_fails_then_succeeds_once_it_is_up() {
    let (pa, pb) = (free_port(), free_port());
    let a = Node::start("A", pa, 2, &[("B", pb)], &["--connect-timeout", "1.5"]);
    let mut conn = a.c.connect();
    for attempt in 0..3 {
        let t = Instant::now();
        let r = conn.call(&relay_req("B", 1, &json!(attempt)));
        let took = t.elapsed();
        assert_eq!(r["out"], "error", "relay to a node that is down: {r}");
        let why = r["result"].as_str().unwrap_or("");
        assert!(why.starts_with("node B unreachable: "), "reason {why:?}");
        assert!(took < Duration::from_millis(1500) + Duration::from_millis(500), "error after {took:?}");
        conn.ping(&json!("a still serves"));
    }
    // B comes up on its port: the next relay builds a link.
    let b = Node::start("B", pb, 2, &[("A", pa)], &[]);
    let r = conn.call(&relay_req("B", 1, &json!("up")));
    let pid = assert_relayed(&r, "B", 1, &json!("up"));
    assert_eq!(pid, b.c.worker_pids()[1] as u64);

    // B goes away (every process SIGKILLed): relays fail again...
    let mut b = b;
    b.c.kill_all();
    b.c.server.wait_exit(EXIT_TIMEOUT);
    let ok = poll_until(Duration::from_secs(5), || {
        let r = conn.call(&relay_req("B", 1, &json!("gone?")));
        r["out"] == "error"
    });
    assert!(ok, "relays to a killed node kept succeeding");
    let r = conn.call(&relay_req("B", 1, &json!("down")));
    assert!(r["result"].as_str().is_some_and(|s| s.starts_with("node B unreachable")), "{r}");
    drop(b);
    // ... and work again when it is back.
    let b2 = Node::start("B", pb, 2, &[("A", pa)], &[]);
    let r = conn.call(&relay_req("B", 1, &json!("back")));
    let pid = assert_relayed(&r, "B", 1, &json!("back"));
    assert_eq!(pid, b2.c.worker_pids()[1] as u64);
    conn.ping(&json!("stats")); // see relays_served_by_the_remote_worker_show_in_its_status
    let v = a.c.wait_status("the failures counted", STATS_TIMEOUT, |v| {
        let w = conn_worker(v, "B", 1);
        w.is_some_and(|l| l["failures"].as_u64() >= Some(4) && l["state"] == "up")
    });
    eprintln!("link table after the outages: {}", v["workers"]);
}

/// The link row to (node, worker) of whichever of A's workers has one.
fn conn_worker(v: &Value, node: &str, w: usize) -> Option<Value> {
    (0..v["workers"].as_array()?.len()).find_map(|i| Node::link(v, i, node, w))
}

#[test]
fn peer_that_accepts_but_never_answers_times_out() {
    // A "node" that completes the TCP handshake (kernel backlog) and never reads.
    let silent = TcpListener::bind(SocketAddrV4::new(LOCALHOST, 0)).unwrap();
    let ps = silent.local_addr().unwrap().port();
    let a = Node::start("A", free_port(), 2, &[("S", ps)], &["--connect-timeout", "0.3"]);
    let mut conn = a.c.connect();
    let t = Instant::now();
    // Two relays queue on the same pending link; both fail.
    let mut two = frame(&relay_req("S", 0, &json!(1)));
    two.extend(frame(&relay_req("S", 0, &json!(2))));
    conn.send_raw(&two);
    let r1 = conn.recv();
    let r2 = conn.recv();
    let took = t.elapsed();
    for r in [&r1, &r2] {
        assert_eq!(r["out"], "error", "{r}");
        let why = r["result"].as_str().unwrap_or("");
        assert!(why.starts_with("node S unreachable: "), "{why:?}");
        assert!(why.contains("handshake"), "reason names the handshake timeout: {why:?}");
    }
    assert!(took >= Duration::from_millis(250), "failed after {took:?}, before the 0.3 s connect timeout");
    assert!(took < Duration::from_millis(1500), "failed only after {took:?} with a 0.3 s connect timeout");
    // The client connection is fine; the next relay tries (and fails) again.
    conn.ping(&json!("ok"));
    let t = Instant::now();
    let r = conn.call(&relay_req("S", 1, &json!(3)));
    assert_eq!(r["out"], "error", "{r}");
    assert!(t.elapsed() < Duration::from_millis(1500));
    drop(silent);
}

/// One client connection streams relays to B:1 (a writer keeps up to 32
/// in flight, a reader checks every reply in order) while B's worker 1 is
/// SIGKILLed. Every reply must be the relay's echo or a `node B
/// unreachable` error, in order; once the respawned worker answers, every
/// later relay succeeds.
#[test]
fn sigkill_of_the_remote_worker_mid_stream_recovers_after_respawn() {
    const WINDOW: usize = 32;
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let old = b.c.worker_pids()[1];
    let stop = AtomicBool::new(false);
    let log: Mutex<Vec<Value>> = Mutex::new(Vec::new());
    let mut conn = a.c.connect();
    let mut w = conn.s.try_clone().unwrap();
    let (credit_tx, credit_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let stop = &stop;
        let writer = s.spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if i >= WINDOW && credit_rx.recv_timeout(IO_TIMEOUT).is_err() {
                    break; // the reader stopped
                }
                w.write_all(&frame(&relay_req("B", 1, &json!({"i": i})))).expect("write relay");
                i += 1;
            }
            w.write_all(&frame(&ping_req(&json!("end")))).expect("write end");
            i
        });
        let reader = s.spawn(|| {
            for i in 0.. {
                let r = conn.recv();
                if r == json!({"out": "pong", "result": "end"}) {
                    return i;
                }
                if r["out"] == "relayed" {
                    assert_relayed(&r, "B", 1, &json!({"i": i}));
                } else {
                    assert_eq!(r["out"], "error", "reply {i}: {r}");
                    let why = r["result"].as_str().unwrap_or("");
                    assert!(why.starts_with("node B unreachable"), "reply {i}: {r}");
                }
                log.lock().unwrap().push(r);
                let _ = credit_tx.send(());
            }
            unreachable!()
        });
        let count_from = |pid: i32| log.lock().unwrap().iter().filter(|r| r["result"]["pid"] == json!(pid)).count();
        let ok = poll_until(Duration::from_secs(10), || count_from(old) >= 100 || reader.is_finished());
        assert!(ok && !reader.is_finished(), "relays to B:1 did not get going");
        kill_pid(old, libc::SIGKILL);
        let v = b.c.wait_status("B's worker 1 respawned", Duration::from_secs(10), |v| {
            v["workers"][1]["respawns"] == json!(1) && v["workers"][1]["pid"].as_i64().is_some_and(|p| p as i32 != old)
        });
        let new = v["workers"][1]["pid"].as_i64().unwrap() as i32;
        let ok = poll_until(Duration::from_secs(10), || count_from(new) >= 100 || reader.is_finished());
        stop.store(true, Ordering::Relaxed);
        let sent = writer.join().expect("writer");
        let got = reader.join().expect("reader: a reply was wrong or missing");
        assert_eq!(got, sent, "one reply per relay");
        assert!(ok, "relays to B:1 did not recover after the respawn (pid {new})");
    });
    let log = log.into_inner().unwrap();
    let new = b.c.worker_pids()[1];
    let errors = log.iter().filter(|r| r["out"] == "error").count();
    let first_new = log.iter().position(|r| r["result"]["pid"] == json!(new)).expect("a reply from the new worker");
    let later: Vec<&Value> = log[first_new..].iter().filter(|r| r["result"]["pid"] != json!(new)).collect();
    assert!(later.is_empty(), "after the new worker answered: {later:?}");
    assert!(log[..first_new].iter().all(|r| r["out"] == "error" || r["result"]["pid"] == json!(old)));
    eprintln!("remote worker kill: {} relays, {errors} error(s) around the kill", log.len());
    // Both nodes still serve.
    let mut c2 = a.c.connect();
    c2.ping(&json!(1));
    assert_relayed(&c2.call(&relay_req("B", 0, &json!(2))), "B", 0, &json!(2));
    assert_eq!(a.c.status()["workers"][0]["respawns"], json!(0));
}

/// The same kill with ONE relay at a time (the client waits for each
/// reply), 15 times: a relay in flight when B's worker 1 dies must still
/// be answered (relayed, or the "unreachable" error), never left hanging.
/// B's master closes a dead worker's node links (it does not rescue them
/// as client connections), so A's worker sees the link close at once.
#[test]
fn relay_in_flight_when_the_remote_worker_dies_is_answered() {
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    for round in 0..15 {
        let old = b.c.worker_pids()[1];
        let stop = AtomicBool::new(false);
        let count = std::sync::atomic::AtomicUsize::new(0);
        let mut conn = a.c.connect();
        conn.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std::thread::scope(|s| {
            let t = s.spawn(|| -> Result<(), String> {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    conn.send(&relay_req("B", 1, &json!(i)));
                    match conn.try_recv() {
                        Ok(Some(r)) if r["out"] == "relayed" || r["out"] == "error" => {}
                        other => return Err(format!("round {round}, relay {i} (sequential): {other:?}")),
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            });
            assert!(poll_until(Duration::from_secs(10), || count.load(Ordering::Relaxed) >= 50 || t.is_finished()));
            kill_pid(old, libc::SIGKILL);
            b.c.wait_status("B's worker 1 respawned", Duration::from_secs(10), |v| {
                v["workers"][1]["pid"].as_i64().is_some_and(|p| p as i32 != old && p > 0)
            });
            let at = count.load(Ordering::Relaxed);
            let moved =
                poll_until(Duration::from_secs(8), || count.load(Ordering::Relaxed) >= at + 50 || t.is_finished());
            stop.store(true, Ordering::Relaxed);
            let r = t.join().unwrap();
            assert!(moved && r.is_ok(), "relay stream stopped after the kill: {r:?}");
        });
    }
}

/// With an idle link A:0 -> B:1, SIGKILL B's worker 1 and wait for its
/// respawn: the next relay must succeed over a new link (B's master closed
/// the old one; it does not hand it to worker 0 as a client).
#[test]
fn idle_link_to_a_respawned_worker_is_rebuilt_without_a_failed_relay() {
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut conn = a.conn_on(0);
    assert_relayed(&conn.call(&relay_req("B", 1, &json!(1))), "B", 1, &json!(1));
    let before = b.c.status();
    let old = before["workers"][1]["pid"].as_i64().unwrap() as i32;
    kill_pid(old, libc::SIGKILL);
    let v = b.c.wait_status("B's worker 1 respawned", Duration::from_secs(10), |v| {
        v["workers"][1]["pid"].as_i64().is_some_and(|p| p as i32 != old && p > 0)
    });
    eprintln!("B worker 0 handed before {} after {}", before["workers"][0]["handed"], v["workers"][0]["handed"]);
    let new = v["workers"][1]["pid"].as_u64().unwrap();
    let r = conn.call(&relay_req("B", 1, &json!(2)));
    assert_eq!(r["out"], "relayed", "first relay after B:1 was respawned: {r}");
    assert_eq!(assert_relayed(&r, "B", 1, &json!(2)), new);
}

#[test]
fn garbage_on_the_manager_port_is_closed_and_the_node_keeps_serving() {
    use handoff::topology::node::wire::{encode, Cmd};
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let b = &nodes[1];
    let connect_req = encode(Cmd::ConnectReq, 0, &json!({"node": "A", "worker": 0, "to": 1}));
    let mut bad_version = connect_req.clone();
    bad_version[4] = 9;
    let mut bad_cmd = connect_req.clone();
    bad_cmd[5] = 99;
    let mut too_long = connect_req[..16].to_vec();
    too_long[12..16].copy_from_slice(&(2u32 << 20).to_le_bytes());
    let mut bad_json = connect_req[..16].to_vec();
    bad_json[12..16].copy_from_slice(&3u32.to_le_bytes());
    bad_json.extend_from_slice(b"{x!");
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("magic then zeros", {
            let mut v = b"HNOD".to_vec();
            v.extend_from_slice(&[0; 40]);
            v
        }),
        ("bad version", bad_version),
        ("bad command", bad_cmd),
        ("body over 1 MiB", too_long),
        ("bad JSON body", bad_json),
        ("TELL_REQ first", encode(Cmd::TellReq, 0, &json!({"node": "A", "worker": 0, "pid": 1}))),
        ("DATA first", encode(Cmd::Data, 1, &json!({"msg": 1}))),
        ("random bytes", Rng(0x5eed).bytes(3000)),
    ];
    for (what, bytes) in &garbage {
        let mut g = b.c.connect();
        g.send_raw(bytes);
        g.expect_closed(Duration::from_secs(5)).unwrap_or_else(|e| panic!("{what}: {e}"));
        // B keeps serving clients and links.
        b.c.connect().ping(&json!(what));
        let mut ca = nodes[0].c.connect();
        assert_relayed(&ca.call(&relay_req("B", 1, &json!(what))), "B", 1, &json!(what));
    }
    // A CONNECT_REQ for a worker B does not have: refused, then closed.
    let mut g = b.c.connect();
    g.send_raw(&encode(Cmd::ConnectReq, 0, &json!({"node": "A", "worker": 0, "to": 9})));
    let mut resp = Vec::new();
    let _ = std::io::Read::read_to_end(&mut g.s, &mut resp);
    assert!(resp.len() >= 16 && &resp[..4] == b"HNOD" && resp[5] == Cmd::ConnectResp as u8, "{resp:?}");
    let body: Value = serde_json::from_slice(&resp[16..]).unwrap();
    assert_eq!(body["ok"], json!(false), "{body}");
    let v = b.c.status();
    assert_eq!(worker_field(&v, "respawns"), vec![0, 0], "no worker died: {v}");
    let s = handoff::client::rpc(&b.c.rpc_opts(4, 50, false));
    assert!(s.passed(), "{s}");
}

#[test]
fn a_link_is_reused_for_many_relays() {
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let a = &nodes[0];
    let mut conn = a.conn_on(0);
    for i in 0..300 {
        assert_relayed(&conn.call(&relay_req("B", 1, &json!(i))), "B", 1, &json!(i));
    }
    // A second client connection on the same worker uses the same link.
    let mut other = a.conn_on(0);
    let mut batch = Vec::new();
    for i in 0..200 {
        batch.extend(frame(&relay_req("B", 1, &json!({"b": i}))));
    }
    other.send_raw(&batch);
    for i in 0..200 {
        assert_relayed(&other.recv(), "B", 1, &json!({"b": i}));
    }
    // And the load client on top (its connections land on both workers).
    let mut o = a.c.rpc_opts(4, 50, false);
    o.relay = Some(("B".into(), 1));
    let s = handoff::client::rpc(&o);
    assert!(s.passed(), "{s}");
    // A client request on each worker makes it send stats; ACKs alone do
    // not (see relays_served_by_the_remote_worker_show_in_its_status).
    conn.ping(&json!("stats"));
    a.conn_on(1).ping(&json!("stats"));
    let v = a.c.wait_status("the link counters", STATS_TIMEOUT, |v| {
        let l0 = Node::link(v, 0, "B", 1);
        let l1 = Node::link(v, 1, "B", 1);
        let acked = |l: &Option<Value>| l.as_ref().and_then(|l| l["acked"].as_u64()).unwrap_or(0);
        acked(&l0) + acked(&l1) == 700 && acked(&l0) >= 500
    });
    for w in 0..2 {
        let l = Node::link(&v, w, "B", 1).unwrap_or_else(|| panic!("worker {w} has no link to B:1: {v}"));
        assert_eq!(l["connects"], json!(1), "worker {w}: one connect for all its relays: {l}");
        assert_eq!(l["failures"], json!(0), "{l}");
        assert_eq!(l["sent"], l["acked"], "{l}");
        assert_eq!(l["state"], "up", "{l}");
        assert!(l["setup_us"].as_u64().is_some_and(|u| u > 0), "{l}");
    }
    // (B's worker 1 "served" count: see the test below.)
}

/// DATA served on an incoming link counts in the remote worker's "served"
/// and reaches the master's status without any other traffic.
#[test]
fn relays_served_by_the_remote_worker_show_in_its_status() {
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut conn = a.c.connect();
    assert_relayed(&conn.call(&relay_req("B", 1, &json!(0))), "B", 1, &json!(0));
    // The link's arrival sent stats (within 100 ms): B:1 served 1.
    b.c.wait_status("B's worker 1 served 1", STATS_TIMEOUT, |v| v["workers"][1]["served"] == json!(1));
    for i in 1..=10 {
        assert_relayed(&conn.call(&relay_req("B", 1, &json!(i))), "B", 1, &json!(i));
    }
    b.c.wait_status("B's worker 1 served 11", STATS_TIMEOUT, |v| v["workers"][1]["served"] == json!(11));
}
