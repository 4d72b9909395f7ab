//! Node mode deadlines: `--relay-timeout` answers a relay that gets no
//! answer, and `--heartbeat` notices a far worker that went silent.
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_support::*;

/// Nodes A and B (2 workers each, knowing each other), both with `extra`.
fn two_nodes(extra: &[&str]) -> (Node, Node) {
    let (pa, pb) = (free_port(), free_port());
    let a = Node::start("A", pa, 2, &[("B", pb)], extra);
    let b = Node::start("B", pb, 2, &[("A", pa)], extra);
    (a, b)
}

/// SIGSTOPs a process; SIGCONTs it when dropped (a failing test never
/// leaves it stopped).
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        kill_pid(pid, libc::SIGSTOP);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        kill_pid(self.0, libc::SIGCONT);
    }
}

/// The status row of `node`'s worker `w` link to B:1 once `cond` holds.
#[track_caller]
fn wait_link(node: &Node, w: usize, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let v = node.c.wait_status(what, STATS_TIMEOUT, |v| Node::link(v, w, "B", 1).is_some_and(|l| cond(&l)));
    Node::link(&v, w, "B", 1).expect("checked")
}

#[test]
fn relay_to_a_stopped_worker_times_out_and_the_connection_goes_on() {
    // Heartbeats slow enough that the link outlives the stop.
    let (a, b) = two_nodes(&["--relay-timeout", "1", "--heartbeat", "5"]);
    let mut conn = a.c.connect();
    let w = conn.whoami()["worker"].as_u64().expect("worker index") as usize;
    assert_relayed(&conn.call(&relay_req("B", 1, &json!("before"))), "B", 1, &json!("before"));

    let stopped = Stopped::new(b.c.worker_pids()[1]);
    // A relay to the stopped worker, and a ping pipelined behind it.
    let t = Instant::now();
    let mut two = frame(&relay_req("B", 1, &json!("stuck")));
    two.extend(frame(&ping_req(&json!("behind"))));
    conn.send_raw(&two);
    let r = conn.recv();
    let took = t.elapsed();
    assert_eq!(r["out"], "error", "{r}");
    let why = r["result"].as_str().unwrap_or("");
    assert!(why.contains("timeout"), "the error says timeout: {why:?}");
    assert!(took >= Duration::from_millis(900), "timed out after {took:?}, before the 1 s relay timeout");
    assert!(took < Duration::from_millis(2500), "timed out only after {took:?} with a 1 s relay timeout");
    eprintln!("relay to a stopped worker answered with a timeout after {took:?} (--relay-timeout 1)");
    // The request behind it is answered, in order, and the connection
    // goes on: a ping, and a relay to B's other worker.
    assert_eq!(conn.recv(), json!({"out": "pong", "result": "behind"}));
    conn.ping(&json!("still usable"));
    assert_relayed(&conn.call(&relay_req("B", 0, &json!("other"))), "B", 0, &json!("other"));

    // Resumed, B:1 answers the timed-out relay late: that ACK is dropped,
    // and the same link carries the next relay.
    drop(stopped);
    assert_relayed(&conn.call(&relay_req("B", 1, &json!("after"))), "B", 1, &json!("after"));
    conn.ping(&json!("stats"));
    let l = wait_link(&a, w, "the timeout counted", |l| l["timeouts"] == json!(1) && l["acked"] == json!(2));
    assert_eq!(l["connects"], json!(1), "one link throughout: {l}");
    assert_eq!(l["failures"], json!(0), "the late ACK did not close the link: {l}");
    assert_eq!(l["state"], "up", "{l}");
    assert_eq!(l["sent"], json!(3), "{l}");
    assert!(a.c.status_cli(false).contains("timeouts"), "the link table has a timeouts column");
}

#[test]
fn heartbeat_notices_a_stopped_peer() {
    // The relay deadline is far off: only the heartbeat can notice.
    let (a, b) = two_nodes(&["--relay-timeout", "60", "--heartbeat", "0.3"]);
    let mut conn = a.c.connect();
    let w = conn.whoami()["worker"].as_u64().expect("worker index") as usize;
    assert_relayed(&conn.call(&relay_req("B", 1, &json!("before"))), "B", 1, &json!("before"));
    // A's worker heard from B:1 last before this (its ACK, or a PONG since).
    let heard = Instant::now();

    let _stopped = Stopped::new(b.c.worker_pids()[1]);
    let t = Instant::now();
    let r = conn.call(&relay_req("B", 1, &json!("stuck")));
    let took = t.elapsed();
    assert_eq!(r["out"], "error", "{r}");
    let why = r["result"].as_str().unwrap_or("");
    assert!(why.contains("unreachable"), "{why:?}");
    assert!(why.contains("heartbeat"), "the reason names the heartbeat: {why:?}");
    // Dead after 3 silent intervals (0.9 s) from the last byte heard.
    let since = heard.elapsed();
    assert!(since >= Duration::from_millis(850), "declared dead {since:?} after the last answer: before 3 x 0.3 s");
    assert!(took < Duration::from_millis(2000), "declared dead only after {took:?} (3 x 0.3 s heartbeats)");
    eprintln!("stopped peer declared dead after {took:?} (--heartbeat 0.3)");
    conn.ping(&json!("stats"));
    let l = wait_link(&a, w, "the link down", |l| l["state"] == "down");
    assert_eq!(l["failures"], json!(1), "{l}");
    assert_eq!(l["timeouts"], json!(0), "failed by the heartbeat, not the relay deadline: {l}");
    let table = a.c.status_cli(false);
    assert!(table.lines().any(|l| l.contains("B:1") && l.contains("down")), "link table:\n{table}");
}

#[test]
fn an_idle_link_survives_many_heartbeats() {
    let (a, _b) = two_nodes(&["--heartbeat", "0.2"]);
    let mut conn = a.c.connect();
    let w = conn.whoami()["worker"].as_u64().expect("worker index") as usize;
    assert_relayed(&conn.call(&relay_req("B", 1, &json!(1))), "B", 1, &json!(1));
    // Idle for 7 intervals: past the opener's 3 and B's 4 of silence, so
    // the link is alive only if PING and PONG flow.
    std::thread::sleep(Duration::from_millis(1400));
    assert_relayed(&conn.call(&relay_req("B", 1, &json!(2))), "B", 1, &json!(2));
    conn.ping(&json!("stats"));
    let l = wait_link(&a, w, "both relays acked", |l| l["acked"] == json!(2));
    assert_eq!(l["connects"], json!(1), "the idle link was kept: {l}");
    assert_eq!(l["failures"], json!(0), "{l}");
    assert_eq!(l["state"], "up", "{l}");
}

/// Reads one node-protocol message (blocking): its command byte and body.
fn read_msg(s: &mut std::net::TcpStream) -> (u8, Value) {
    use std::io::Read;
    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr).expect("a message header");
    let len = u32::from_le_bytes(hdr[12..16].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("a message body");
    (hdr[5], serde_json::from_slice(&body).expect("a JSON body"))
}

#[test]
fn an_incoming_link_whose_opener_goes_silent_is_closed() {
    use handoff::topology::node::wire::{encode, Cmd};
    use std::io::{Read, Write};
    let b = Node::start("B", free_port(), 2, &[], &[]);
    // A hand-made opener that announces 0.2 s heartbeats, then never pings.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", b.c.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&encode(Cmd::ConnectReq, 0, &json!({"node": "Z", "worker": 0, "to": 1}))).unwrap();
    let (cmd, v) = read_msg(&mut s);
    assert_eq!((cmd, &v["ok"]), (Cmd::ConnectResp as u8, &json!(true)), "{v}");
    s.write_all(&encode(Cmd::TellReq, 0, &json!({"node": "Z", "worker": 0, "pid": 1, "hb": 0.2}))).unwrap();
    let (cmd, v) = read_msg(&mut s);
    assert_eq!(cmd, Cmd::TellResp as u8);
    assert_eq!(v["hb"], json!(true), "the far worker says it answers PING: {v}");
    // A PING is answered.
    let t = Instant::now();
    s.write_all(&encode(Cmd::Ping, 0, &json!({"hb": 0.2}))).unwrap();
    assert_eq!(read_msg(&mut s).0, Cmd::Pong as u8);
    // Then silence: B closes the link 4 intervals (0.8 s) after the PING.
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let took = t.elapsed();
    assert_eq!(n, 0, "EOF, not data");
    assert!(took >= Duration::from_millis(750), "closed {took:?} after the PING, before 4 x 0.2 s of silence");
    assert!(took < Duration::from_millis(3000), "closed only after {took:?} (4 x 0.2 s of silence)");
}

/// Restarts of either node move their links; the moved links go on with
/// heartbeats (an opener that stopped pinging would be dropped by the far
/// worker after 4 intervals, and one that stopped answering would be
/// taken for dead after 3).
#[test]
fn links_moved_by_restarts_go_on_with_heartbeats() {
    let (a, b) = two_nodes(&["--heartbeat", "0.2", "--relay-timeout", "60"]);
    let mut conn = a.c.connect();
    let w = conn.whoami()["worker"].as_u64().expect("worker index") as usize;
    assert_relayed(&conn.call(&relay_req("B", 1, &json!(1))), "B", 1, &json!(1));
    b.c.restart_ok();
    a.c.restart_ok();
    // The client moved to A's new worker w, with the link to B:1 (moved
    // twice: B's end, then A's). Idle for 7 intervals.
    std::thread::sleep(Duration::from_millis(1400));
    assert_relayed(&conn.call(&relay_req("B", 1, &json!(2))), "B", 1, &json!(2));
    conn.ping(&json!("stats"));
    let l = wait_link(&a, w, "the moved link's relay acked", |l| l["acked"] == json!(1));
    assert_eq!(l["connects"], json!(0), "the moved link was kept, not rebuilt: {l}");
    assert_eq!(l["failures"], json!(0), "{l}");
    assert_eq!(l["state"], "up", "{l}");
    // And the moved link still notices a silent far worker.
    let _stopped = Stopped::new(b.c.worker_pids()[1]);
    let t = Instant::now();
    let r = conn.call(&relay_req("B", 1, &json!("stuck")));
    let why = r["result"].as_str().unwrap_or("");
    assert!(why.contains("unreachable") && why.contains("heartbeat"), "{r}");
    assert!(t.elapsed() < Duration::from_millis(2000), "noticed only after {:?}", t.elapsed());
}
