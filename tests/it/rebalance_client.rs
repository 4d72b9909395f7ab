//! `handoff client work` against a fake rpc server (threads, in this
//! process) that "moves" connections by changing what their whoami says,
//! and that can misbehave: the client's own logic — who is driven, moves
//! seen, the trace, and every unasked byte counted as an error.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use handoff::client::{work, WorkOpts, WorkSummary};
use serde_json::{json, Value};

#[derive(Clone, Copy, Default)]
struct Fake {
    /// Connections of worker 0 say worker 1 after this many work requests.
    move_after: Option<u64>,
    /// Connection k writes its n-th work reply twice.
    dup: Option<(usize, u64)>,
    /// Connection k (worker 1: never driven with --only-worker 0) gets an
    /// unasked frame 100 ms after its whoami.
    stray: Option<usize>,
}

fn frame(v: &Value) -> Vec<u8> {
    let b = serde_json::to_vec(v).unwrap();
    let mut out = (b.len() as u32).to_le_bytes().to_vec();
    out.extend(b);
    out
}

fn read_frame(s: &mut TcpStream) -> Option<Value> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let mut b = vec![0; u32::from_le_bytes(h) as usize];
    s.read_exact(&mut b).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Connection k starts on worker k % 2.
fn serve(mut s: TcpStream, k: usize, f: Fake) {
    s.set_nodelay(true).unwrap();
    let mut worker = k % 2;
    let mut works = 0u64;
    while let Some(req) = read_frame(&mut s) {
        let reply = match req["in"].as_str() {
            Some("whoami") => {
                if f.stray == Some(k) {
                    let mut w = s.try_clone().unwrap();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(100));
                        let _ = w.write_all(&frame(&json!({"out":"pong","result":1})));
                    });
                }
                json!({"out":"whoami","result":{"worker":worker,"pid":std::process::id(),"gen":1}})
            }
            Some("work") => {
                let us = req["params"]["us"].as_u64().unwrap();
                std::thread::sleep(Duration::from_micros(us));
                works += 1;
                if f.move_after == Some(works) && worker == 0 {
                    worker = 1;
                }
                json!({"out":"work","result":us})
            }
            _ => json!({"out":"error","result":"unknown"}),
        };
        let mut out = frame(&reply);
        if f.dup.is_some_and(|(c, n)| c == k && n == works) && req["in"] == "work" {
            out.extend(frame(&reply));
        }
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

/// Runs the client against a fake server until it returns.
fn run(f: Fake, conns: usize, only_worker: Option<u64>, trace: Option<std::path::PathBuf>) -> WorkSummary {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        for (k, s) in l.incoming().enumerate() {
            if d.load(Ordering::Relaxed) {
                return;
            }
            let s = s.unwrap();
            std::thread::spawn(move || serve(s, k, f));
        }
    });
    let s = work(&WorkOpts {
        host: "127.0.0.1".into(),
        port,
        conns,
        us: 200,
        secs: 1.5,
        only_worker,
        trace,
        sample: Duration::from_millis(100),
        unix: None,
    });
    done.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(("127.0.0.1", port)); // wakes the acceptor
    s
}

#[test]
fn skewed_load_sees_every_move() {
    let dir = std::env::temp_dir().join(format!("hoit-work-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.tsv");
    let s = run(Fake { move_after: Some(30), ..Fake::default() }, 20, Some(0), Some(trace.clone()));
    let line = s.to_string();
    assert!(s.passed(), "{line}");
    assert_eq!((s.driven, s.moved), (10, 10), "{line}");
    assert!(line.contains(" driven_start=10/0 driven_end=0/10 "), "{line}");
    let first = s.first_moved_ms.expect("moves seen");
    assert!((1..1500).contains(&first), "{line}");
    // All of 1.5 s is in the first interval (0 to 3 s).
    assert!(s.ok > 100 && s.rps > 0.0 && s.rps_early == s.rps && s.rps_late == 0.0, "{line}");
    assert!(line.contains(" rps_0_1.5=") && line.contains(" rps_1.5_1.5=0 "), "{line}");

    let t = std::fs::read_to_string(&trace).unwrap();
    let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows[0], ["t_s", "rps", "conns_w0", "conns_w1", "busy_w0", "busy_w1"], "{t}");
    assert!((13..=16).contains(&(rows.len() - 1)), "about 1.5 s / 100 ms rows: {t}");
    assert_eq!(&rows[1][2..4], ["10", "0"], "{t}");
    assert_eq!(&rows[rows.len() - 1][2..4], ["0", "10"], "{t}");
    for r in &rows[1..] {
        let busy: f64 = r[4].parse().unwrap();
        assert!((0.0..=4.0).contains(&busy), "{t}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn even_load_drives_every_connection() {
    let s = run(Fake::default(), 12, None, None);
    let line = s.to_string();
    assert!(s.passed(), "{line}");
    assert_eq!((s.driven, s.moved, s.first_moved_ms), (12, 0, None), "{line}");
    assert!(line.contains(" driven_start=6/6 driven_end=6/6 ") && line.contains(" first_moved_ms=-1 "), "{line}");
}

#[test]
fn a_duplicated_reply_is_an_error() {
    let s = run(Fake { dup: Some((0, 5)), ..Fake::default() }, 4, Some(0), None);
    assert!(s.errors >= 1 && !s.passed(), "{s}");
}

#[test]
fn bytes_on_an_idle_connection_are_an_error() {
    let s = run(Fake { stray: Some(1), ..Fake::default() }, 4, Some(0), None);
    assert_eq!(s.errors, 1, "{s}");
    assert!(!s.passed(), "{s}");
}

#[test]
fn nothing_to_drive_is_an_error() {
    let s = run(Fake::default(), 4, Some(7), None);
    assert_eq!((s.driven, s.ok), (0, 0), "{s}");
    assert!(!s.passed(), "{s}");
}
