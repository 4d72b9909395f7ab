//! `--rebalance` (issue 12): busy keep-alive connections move from a hot
//! worker to an idle one, between requests, with nothing lost, repeated
//! or reordered; an even load moves nothing.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_support::*;

const WORK_US: u64 = 300;

/// Which worker answers on this connection.
fn worker_of(r: &mut Rpc) -> u64 {
    r.whoami()["worker"].as_u64().expect("whoami has a worker")
}

/// Drives each of `conns` with back-to-back `work` requests (one
/// outstanding), checking every reply, until `stop`; `done` counts them.
/// Returns the first error.
fn drive(conns: &mut [Rpc], stop: &AtomicBool, done: &AtomicU64) -> Result<(), String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                s.spawn(move || -> Result<(), String> {
                    let req = json!({"in": "work", "params": {"us": WORK_US}});
                    let want = json!({"out": "work", "result": WORK_US});
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        c.send_raw(&frame(&req));
                        match c.try_recv() {
                            Ok(Some(v)) if v == want => {}
                            other => return Err(format!("connection {i}, request {n}: {other:?}")),
                        }
                        n += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    if c.nothing_pending(Duration::from_millis(20)) {
                        Ok(())
                    } else {
                        Err(format!("connection {i}: bytes after the last reply (a duplicate?)"))
                    }
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().expect("driver thread"))
    })
}

/// 40 connections; the ones on the worker holding most of them (worker 0
/// under round-robin, where each holds 20) are driven. Returns (how many
/// were driven, how many of them answer from the other worker after `secs`).
fn skewed(c: &Cluster, secs: f64) -> (usize, usize) {
    let mut on: [Vec<Rpc>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..40 {
        let mut r = c.connect();
        let w = worker_of(&mut r) as usize;
        on[w].push(r);
    }
    let first = if on[1].len() > on[0].len() { 1 } else { 0 };
    let mut hot = std::mem::take(&mut on[first]);
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let driven = hot.len();
    let res = std::thread::scope(|s| {
        let t = s.spawn(|| drive(&mut hot, &stop, &done));
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        t.join().expect("drive")
    });
    res.expect("every work reply, in order, once");
    let moved = hot.iter_mut().map(worker_of).filter(|&w| w != first as u64).count();
    (driven, moved)
}

fn moves(v: &Value) -> (u64, u64) {
    (sum_field(v, "moved_in"), sum_field(v, "moved_out"))
}

#[test]
fn a_skewed_load_moves_busy_connections_to_the_idle_worker() {
    let c = Cluster::start(2, &["--rebalance"]);
    let t = Instant::now();
    let (driven, moved) = skewed(&c, 3.0);
    assert!(driven >= 16, "round-robin put {driven} of 40 on worker 0");
    assert!(moved >= 8, "after 3 s, {moved} of {driven} driven connections answer from worker 1");
    let v = c.status();
    let (inn, out) = moves(&v);
    assert_eq!(inn, out, "every move out is a move in: {v}");
    assert_eq!(v["workers"][1]["moved_in"], json!(moved), "{v}");
    assert!(v["workers"][0]["busy"].as_f64().is_some(), "status shows busy: {v}");
    eprintln!("skew: {moved} of {driven} moved within {:?}", t.elapsed());
}

#[test]
fn without_rebalance_nothing_moves() {
    let c = Cluster::start(2, &[]);
    let (driven, moved) = skewed(&c, 2.0);
    assert_eq!(moved, 0, "{moved} of {driven} moved without --rebalance");
    assert_eq!(moves(&c.status()), (0, 0));
}

#[test]
fn shared_policy_skew_is_rebalanced_too() {
    let c = Cluster::start(2, &["--policy", "shared", "--rebalance"]);
    let (driven, moved) = skewed(&c, 3.0);
    assert!(driven >= 20, "the busier worker holds {driven} of 40");
    assert!(moved >= 8, "after 3 s, {moved} of {driven} driven connections answer from the other worker");
}

#[test]
fn an_even_load_moves_at_most_two_connections() {
    let c = Cluster::start(2, &["--rebalance"]);
    let mut all: Vec<Rpc> = (0..40).map(|_| c.connect()).collect();
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        let t = s.spawn(|| drive(&mut all, &stop, &done));
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::Relaxed);
        t.join().expect("drive")
    })
    .expect("every work reply, in order, once");
    let (inn, out) = moves(&c.status());
    assert!(out <= 2 && inn == out, "an even load moved {out} connection(s)");
}

#[test]
fn pipelined_clients_survive_rebalancing_and_restarts() {
    let c = Cluster::start(2, &["--rebalance"]);
    // A skew of work on worker 0 keeps rebalancing busy meanwhile.
    let mut hot: Vec<Rpc> =
        (0..10).map(|_| c.connect()).filter_map(|mut r| (worker_of(&mut r) == 0).then_some(r)).collect();
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let results = std::thread::scope(|s| {
        let t = s.spawn(|| drive(&mut hot, &stop, &done));
        let results = pipelined_restarts(&c, 100, 20, 2, false);
        stop.store(true, Ordering::Relaxed);
        t.join().expect("drive").expect("every work reply, in order, once");
        results
    });
    assert_pipelined_ok(&results, 3);
    assert!(c.status()["rebalance"] == json!(true), "a restart keeps --rebalance");
}
