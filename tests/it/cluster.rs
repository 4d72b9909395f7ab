//! Cluster mode: a master hands each connection to a prefork worker.
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_support::*;

#[test]
fn ping_echoes_varied_json_values_exactly() {
    let c = Cluster::start(2, &[]);
    check_ping_echoes(|| c.connect(), &ping_values());
}

#[test]
fn round_robin_spreads_short_connections_evenly() {
    let c = Cluster::start(4, &[]);
    let pids = c.worker_pids();
    let mut by_worker: BTreeMap<u64, u64> = BTreeMap::new();
    for _ in 0..400 {
        let who = c.connect().whoami();
        let w = who["worker"].as_u64().expect("worker index");
        assert_eq!(who["pid"], json!(pids[w as usize]), "whoami {who} vs status pids {pids:?}");
        assert_eq!(who["gen"], json!(1));
        *by_worker.entry(w).or_default() += 1;
    }
    assert_eq!(by_worker.len(), 4, "every worker gets connections: {by_worker:?}");
    let (lo, hi) = (by_worker.values().min().unwrap(), by_worker.values().max().unwrap());
    assert!(hi - lo <= 2, "round-robin imbalance: {by_worker:?}");
    let v = c.status();
    let handed = worker_field(&v, "handed");
    assert_eq!(handed.iter().sum::<u64>(), 400, "{v}");
    assert!(handed.iter().max().unwrap() - handed.iter().min().unwrap() <= 2, "handed {handed:?}");
    for (w, n) in &by_worker {
        assert_eq!(handed[*w as usize], *n, "status handed vs whoami counts: {handed:?} {by_worker:?}");
    }
}

#[test]
fn least_conn_sends_new_connections_to_the_idle_worker() {
    const K: usize = 8;
    let c = Cluster::start(2, &["--policy", "least-conn"]);
    // 2K connections: least-conn alternates while the counts tie.
    let mut held: Vec<(u64, Rpc)> = (0..2 * K)
        .map(|_| {
            let mut r = c.connect();
            let w = r.whoami()["worker"].as_u64().unwrap();
            (w, r)
        })
        .collect();
    let busy = held[0].0;
    let idle = 1 - busy;
    assert_eq!(held.iter().filter(|(w, _)| *w == busy).count(), K, "ties alternate");
    // Close the other worker's connections; it is then the idle one.
    held.retain(|(w, _)| *w == busy);
    c.wait_status("the idle worker with no open connection", STATS_TIMEOUT, |v| {
        worker_field(v, "open") == if busy == 0 { vec![K as u64, 0] } else { vec![0, K as u64] }
    });
    // The next K connections all go to the idle worker.
    let mut fresh = Vec::new();
    for i in 0..K {
        let mut r = c.connect();
        let w = r.whoami()["worker"].as_u64().unwrap();
        assert_eq!(w, idle, "new connection {i} went to the busy worker {busy} (holding {K})");
        fresh.push(r);
    }
    // Now tied at K: both get connections again.
    let mut seen = HashSet::new();
    for _ in 0..2 {
        let mut r = c.connect();
        seen.insert(r.whoami()["worker"].as_u64().unwrap());
        fresh.push(r);
    }
    assert_eq!(seen.len(), 2, "once tied, both workers get connections");
    assert_eq!(c.status()["policy"], "least-conn");
}

#[test]
fn thousand_pipelined_requests_answered_in_order() {
    let c = Cluster::start(2, &[]);
    let mut conn = c.connect();
    let mut w = conn.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut all = Vec::new();
        for i in 0..1000u32 {
            // A mix of pings and whoamis, in one write.
            if i % 100 == 99 {
                all.extend(frame(&json!({"in": "whoami"})));
            } else {
                all.extend(frame(&ping_req(&json!({"i": i}))));
            }
        }
        w.write_all(&all).unwrap();
    });
    let mut worker = None;
    for i in 0..1000u32 {
        let r = conn.recv();
        if i % 100 == 99 {
            assert_eq!(r["out"], "whoami", "reply {i}: {r}");
            let me = r["result"]["worker"].clone();
            assert!(worker.get_or_insert(me.clone()) == &me, "one connection, one worker");
        } else {
            assert_eq!(r, json!({"out": "pong", "result": {"i": i}}), "reply {i} out of order");
        }
    }
    writer.join().unwrap();
    assert!(conn.nothing_pending(Duration::from_millis(100)), "extra replies after 1000");
}

#[test]
fn two_thousand_idle_connections_then_each_sends_a_request() {
    const N: usize = 2000;
    let limit = handoff::core::sock::raise_nofile().expect("raise RLIMIT_NOFILE");
    assert!(limit >= 2 * N as u64 + 100, "RLIMIT_NOFILE hard limit {limit} too low for {N} connections");
    let c = Cluster::start(2, &[]);
    let mut conns: Vec<Rpc> = (0..N).map(|_| c.connect()).collect();
    // All handed out and idle in the workers.
    c.wait_status("every connection open in a worker", Duration::from_secs(10), |v| {
        sum_field(v, "open") == N as u64 && sum_field(v, "handed") == N as u64
    });
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.send(&ping_req(&json!(i)));
    }
    for (i, conn) in conns.iter_mut().enumerate() {
        assert_eq!(conn.recv(), json!({"out": "pong", "result": i}), "connection {i}");
    }
    // Once more, in reverse order.
    for (i, conn) in conns.iter_mut().enumerate().rev() {
        conn.send(&ping_req(&json!({"again": i})));
    }
    for (i, conn) in conns.iter_mut().enumerate().rev() {
        assert_eq!(conn.recv(), json!({"out": "pong", "result": {"again": i}}), "connection {i}");
    }
    let v = c.status();
    let open = worker_field(&v, "open");
    assert!(open.iter().all(|&n| n == N as u64 / 2), "round-robin: {open:?}");
    drop(conns);
    c.wait_status("every connection closed", Duration::from_secs(10), |v| {
        sum_field(v, "open") == 0 && sum_field(v, "served") == 2 * N as u64
    });
}

#[test]
fn bad_requests_get_an_error_reply_and_the_connection_stays_usable() {
    let c = Cluster::start(2, &[]);
    let mut conn = c.connect();
    check_bad_requests_get_errors(|| c.connect(), &mut conn);
}

#[test]
fn oversized_frame_closes_only_that_connection() {
    const MAX: usize = 1024;
    let c = Cluster::start(2, &["--max-frame", &MAX.to_string()]);
    let mut bystander = c.connect();
    bystander.ping(&json!("before"));

    // Exactly --max-frame bytes is fine.
    let mut ok = c.connect();
    let pad = |len: usize| {
        let base = serde_json::to_vec(&ping_req(&json!(""))).unwrap().len();
        json!("p".repeat(len - base))
    };
    let x = pad(MAX);
    assert_eq!(serde_json::to_vec(&ping_req(&x)).unwrap().len(), MAX);
    ok.ping(&x);

    // One byte more closes the connection (without an answer).
    let mut victim = c.connect();
    victim.ping(&json!(1));
    let y = pad(MAX + 1);
    victim.send(&ping_req(&y));
    victim.expect_closed(Duration::from_secs(5)).expect("a frame over --max-frame closes the connection");

    // A huge announced length, header only.
    let mut victim2 = c.connect();
    victim2.send_raw(&0xffff_fff0u32.to_le_bytes());
    victim2.expect_closed(Duration::from_secs(5)).expect("a 4 GiB length closes the connection");

    bystander.ping(&json!("after"));
    ok.ping(&json!("still"));
    c.connect().ping(&json!("new"));
    let v = c.status();
    assert_eq!(worker_field(&v, "respawns"), vec![0, 0], "no worker died: {v}");
}

#[test]
fn sigkill_of_a_worker_under_short_connection_load_loses_at_most_the_request_in_its_hands() {
    let c = Cluster::start(2, &[]);
    let before = c.worker_pids();
    let opts = c.rpc_opts(4, 1500, true);
    let load = std::thread::spawn(move || handoff::client::rpc(&opts));
    // Kill worker 0 once the load is well under way.
    c.wait_status("the load under way", Duration::from_secs(20), |v| sum_field(v, "served") >= 500);
    kill_pid(before[0], libc::SIGKILL);
    let killed_at = Instant::now();
    let v = c.wait_status("worker 0 respawned", Duration::from_secs(10), |v| {
        v["workers"][0]["respawns"] == json!(1)
            && v["workers"][0]["pid"].as_i64().is_some_and(|p| p as i32 != before[0])
    });
    let respawned_after = killed_at.elapsed();
    assert!(!load.is_finished(), "the load ended before the kill took effect; make it longer");
    let s = load.join().expect("load thread");
    assert_worker_kill_lost_at_most_one(&s, "worker 0");
    assert!(!pid_alive(before[0]), "killed worker {} still alive", before[0]);
    let new0 = v["workers"][0]["pid"].as_i64().unwrap() as i32;
    assert!(pid_alive(new0));
    assert_eq!(v["workers"][1]["pid"], json!(before[1]), "worker 1 untouched: {v}");
    assert_eq!(v["workers"][1]["respawns"], json!(0), "{v}");
    // The new worker 0 serves, in its slot.
    let mut pids = HashSet::new();
    for _ in 0..4 {
        let who = c.connect().whoami();
        pids.insert((who["worker"].as_u64().unwrap(), who["pid"].as_i64().unwrap() as i32));
    }
    assert!(pids.contains(&(0, new0)), "worker 0 answers with its new pid {new0}: {pids:?}");
    eprintln!("sigkill under load: {s}; respawn seen {respawned_after:?} after the kill");
}

#[test]
fn sigterm_exits_zero_and_leaves_no_worker() {
    let mut c = Cluster::start(3, &["--grace", "5"]);
    check_sigterm_finishes_the_request_in_progress(&mut c);
    assert!(Rpc::try_connect(c.port).is_err(), "port {} still accepts after exit", c.port);
    assert!(c.try_status(Duration::from_secs(1)).is_err(), "status still answers after exit");
}

#[test]
fn status_accounts_for_a_load() {
    let c = Cluster::start(3, &[]);
    let v = c.status();
    assert_eq!(v["port"], json!(c.port));
    assert_eq!(v["policy"], "round-robin");
    assert_eq!(v["gen"], json!(1));
    // The process started is the supervisor; the master is its child.
    assert_eq!(v["supervisor"], json!(c.server.pid()));
    assert_ne!(v["pid"], json!(c.server.pid()));
    assert_eq!(worker_field(&v, "worker"), vec![0, 1, 2]);
    assert_eq!(sum_field(&v, "handed"), 0);

    let ka = handoff::client::rpc(&c.rpc_opts(6, 50, false));
    assert!(ka.passed(), "{ka}");
    let short = handoff::client::rpc(&c.rpc_opts(3, 20, true));
    assert!(short.passed(), "{short}");
    let v = c.wait_status("the load's served counts", STATS_TIMEOUT, |v| {
        sum_field(v, "served") == 6 * 50 + 3 * 20 && sum_field(v, "open") == 0
    });
    assert_eq!(sum_field(&v, "handed"), 6 + 3 * 20, "{v}");
    assert!(worker_field(&v, "handed").iter().all(|&h| h == 22), "round-robin of 66 over 3: {v}");
    assert_eq!(worker_field(&v, "respawns"), vec![0, 0, 0]);

    // The CLI prints the same (JSON), and a table.
    let cli: Value = serde_json::from_str(out_line(&c.status_cli(true))).expect("status --json is JSON");
    assert_eq!(cli["pid"], v["pid"]);
    assert_eq!(worker_field(&cli, "served"), worker_field(&v, "served"));
    let table = c.status_cli(false);
    assert!(table.contains("generation 1") && table.contains(&format!("port {}", c.port)), "{table}");
    assert_eq!(table.lines().count(), 2 + 3, "{table}");
}

fn out_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[test]
fn shared_policy_serves() {
    let c = Cluster::start(2, &["--policy", "shared"]);
    let v = c.status();
    assert_eq!(v["policy"], "shared");
    let ka = handoff::client::rpc(&c.rpc_opts(8, 100, false));
    assert!(ka.passed(), "{ka}");
    let short = handoff::client::rpc(&c.rpc_opts(4, 50, true));
    assert!(short.passed(), "{short}");
    let pids = c.worker_pids();
    for _ in 0..20 {
        let who = c.connect().whoami();
        let w = who["worker"].as_u64().unwrap() as usize;
        assert_eq!(who["pid"], json!(pids[w]));
    }
    c.wait_status("the load's served counts", STATS_TIMEOUT, |v| sum_field(v, "served") == 800 + 200 + 20);
}
