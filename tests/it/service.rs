//! The service API end to end, with `examples/shout.rs`: what a session
//! leaves unconsumed and what it exports travel with the connection, on
//! every topology.
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::cluster_support::{parse_restarted, Cluster, RESTART_TIMEOUT};
use crate::http::example_bin;
use crate::support::{free_pair, run_cmd, TempDir, TestServer};

struct Lines(BufReader<TcpStream>);

impl Lines {
    fn connect(port: u16) -> Lines {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Lines(BufReader::new(s))
    }
    fn send(&mut self, b: &[u8]) {
        self.0.get_mut().write_all(b).expect("write");
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.0.read_line(&mut l).expect("read");
        assert!(l.ends_with('\n'), "connection closed mid-line: {l:?}");
        l
    }
}

#[test]
fn shout_cluster_restart_moves_a_partial_line_and_the_session_state() {
    let c = Cluster::start_with(2, &[], example_bin("shout").as_os_str(), |_| {});
    let mut l = Lines::connect(c.port);
    l.send(b"one\n");
    let first = l.line();
    assert!(first.starts_with("ONE #1 Worker") && first.contains("gen: 1"), "{first:?}");
    // Half a line waits in the worker, unconsumed, when the restart comes.
    l.send(b"half a ");
    let mut cmd = Command::new(example_bin("shout"));
    cmd.arg("restart").arg("--dir").arg(&c.dir);
    let (st, out, err) = run_cmd(&mut cmd, RESTART_TIMEOUT);
    assert!(st.success(), "shout restart: {st}\n{out}\n{err}");
    assert_eq!(parse_restarted(&out).0, 2);
    l.send(b"line\n");
    let second = l.line();
    assert!(second.starts_with("HALF A LINE #2 Worker") && second.contains("gen: 2"), "{second:?}");
}

#[test]
fn shout_pair_hands_the_count_over_on_every_hop() {
    let tmp = TempDir::new("shout");
    let p = free_pair();
    let q = p + 1;
    // The launcher is ready once both servers are linked: from then on
    // each request is answered by the other server.
    let mut cmd = Command::new(example_bin("shout"));
    cmd.args(["pair", "--ports", &format!("{p},{q}"), "--dir"]).arg(tmp.path().join("d"));
    let _pair = TestServer::start_cmd("shout pair", cmd);
    let mut l = Lines::connect(p);
    let mut ports = Vec::new();
    for i in 1..=8 {
        l.send(b"x\n");
        let r = l.line();
        assert!(r.starts_with(&format!("X #{i} Pair")), "request {i}: {r:?}");
        ports.push(if r.contains(&format!("port: {p}")) { p } else { q });
    }
    let alternating = ports.windows(2).all(|w| w[0] != w[1]);
    assert!(alternating, "every request moves the connection: {ports:?}");
}
