//! `--listen unix:PATH`: the same service over a Unix stream socket, next
//! to TCP; restarts keep the socket; node links over a Unix socket.
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::cluster_support::*;
use crate::support::*;

/// A cluster on `--port 0` and `--listen unix:SOCK` (SOCK in a directory
/// of its own, beside the cluster's `--dir`).
fn unix_cluster(workers: usize, extra: &[&str]) -> (Cluster, PathBuf) {
    let tmp = TempDir::new("ul");
    let dir = tmp.path().join("d");
    let sock = tmp.path().join("s.sock");
    let mut args: Vec<String> = vec!["cluster".into(), "--port".into(), "0".into(), "--listen".into()];
    args.push(format!("unix:{}", sock.display()));
    args.extend(["--workers".into(), workers.to_string(), "--dir".into(), dir.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let c = Cluster::launch("cluster", tmp, dir, workers, args);
    (c, sock)
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).permissions().mode() & 0o777
}

fn inode_of(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).ino()
}

#[test]
fn unix_listener_serves_ping_whoami_and_pipelining_beside_tcp() {
    let tmp = TempDir::new("ulog");
    let log = tmp.path().join("access.log");
    let (c, sock) = unix_cluster(2, &["--access-log", log.to_str().unwrap()]);
    let listen = format!("127.0.0.1:{},unix:{}", c.port, sock.display());
    assert_eq!(ready_field(&c.server.ready, "listen").as_deref(), Some(listen.as_str()), "{}", c.server.ready);
    let v = c.status();
    assert_eq!(v["listen"], json!(listen.split(',').collect::<Vec<_>>()), "{v}");
    let text = c.status_cli(false);
    assert!(text.contains(&format!("listening on {}", listen.replace(',', ", "))), "{text}");
    assert_eq!(mode_of(&sock), 0o600, "a Unix listener is 0600 by default");

    let mut u = Rpc::connect_unix(&sock);
    check_ping_echoes(|| Rpc::connect_unix(&sock), &ping_values());
    let who = u.whoami();
    assert_eq!(who["gen"], json!(1), "{who}");
    let pids = c.worker_pids();
    assert!(pids.contains(&(who["pid"].as_u64().unwrap() as i32)), "whoami pid {who} among workers {pids:?}");
    // Pipelining: 200 requests in one write, answered in order.
    let mut bytes = Vec::new();
    for i in 0..200 {
        bytes.extend(frame(&ping_req(&json!({"i": i}))));
    }
    u.send_raw(&bytes);
    for i in 0..200 {
        assert_eq!(u.recv(), json!({"out": "pong", "result": {"i": i}}), "reply {i}");
    }
    assert!(u.nothing_pending(Duration::from_millis(50)), "no extra reply");
    // TCP alongside.
    let mut t = c.connect();
    t.ping(&json!("tcp"));
    // Both kinds reach both workers (round-robin over one queue).
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(Rpc::connect_unix(&sock).whoami()["worker"].as_u64().unwrap());
    }
    assert_eq!(seen.len(), 2, "Unix clients reach every worker: {seen:?}");

    // The access log names a Unix client by its pid.
    drop(u);
    let me = format!("client=unix:{} ", std::process::id());
    let ok = poll_until(Duration::from_secs(10), || std::fs::read_to_string(&log).unwrap_or_default().contains(&me));
    assert!(ok, "no '{me}' line in the access log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
}

#[test]
fn unix_only_listener_with_mode_0660_restarts_and_probes_over_unix() {
    let tmp = TempDir::new("ulo");
    let dir = tmp.path().join("d");
    let sock = tmp.path().join("only.sock");
    let args: Vec<String> = vec![
        "cluster".into(),
        "--listen".into(),
        format!("unix:{}", sock.display()),
        "--listen-mode".into(),
        "0660".into(),
        "--workers".into(),
        "1".into(),
        "--dir".into(),
        dir.display().to_string(),
    ];
    let mut c = Cluster::launch("cluster", tmp, dir.clone(), 1, args);
    assert_eq!(
        c.server.ready,
        format!("ready port=0 workers=1 dir={} gen=1 listen=unix:{}", dir.display(), sock.display())
    );
    assert_eq!(mode_of(&sock), 0o660, "--listen-mode 0660");
    let mut kept = Rpc::connect_unix(&sock);
    kept.ping(&json!("before"));
    // `handoff restart` probes the first endpoint: the Unix one here.
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    assert_eq!(kept.whoami()["gen"], json!(2), "the Unix connection moved");
    assert_eq!(Rpc::connect_unix(&sock).whoami()["gen"], json!(2));
    assert_eq!(mode_of(&sock), 0o660, "the restart kept the socket");
    // The service's end removes the socket file.
    c.server.signal(libc::SIGTERM);
    let st = c.server.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "{st}");
    assert!(!sock.exists(), "{} left after a clean stop", sock.display());
}

#[test]
fn a_live_unix_socket_refuses_a_second_server_and_a_stale_one_is_replaced() {
    let (c, sock) = unix_cluster(1, &[]);
    let tmp = TempDir::new("ul2");
    let live = run_cmd(
        Command::new(bin())
            .args(["cluster", "--workers", "1", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .args(["--dir".as_ref(), tmp.path().join("d").as_os_str()]),
        EXIT_TIMEOUT,
    );
    assert!(!live.0.success(), "a second server started on a live socket: {live:?}");
    assert!(live.2.contains("owned by a live process"), "stderr: {}", live.2);
    let mut r = Rpc::connect_unix(&sock);
    r.ping(&json!("the first server still serves"));

    // A socket file nobody listens on (a dead server's) is replaced.
    let stale = tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    assert!(Rpc::try_connect_unix(&stale).is_err(), "nobody listens on the stale file");
    let d2 = tmp.path().join("d2");
    let args: Vec<String> = vec![
        "cluster".into(),
        "--listen".into(),
        format!("unix:{}", stale.display()),
        "--workers".into(),
        "1".into(),
        "--dir".into(),
        d2.display().to_string(),
    ];
    let c2 = Cluster::launch("cluster", TempDir::new("ul3"), d2, 1, args);
    let log = c2.server.stderr_text();
    assert!(log.contains(&format!("removing stale {}", stale.display())), "{log}");
    Rpc::connect_unix(&stale).ping(&json!("on the replaced socket"));
    drop(c2);
    // A path that is not a socket is never removed.
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let (st, _out, err) = run_cmd(
        Command::new(bin())
            .args(["cluster", "--workers", "1", "--listen"])
            .arg(format!("unix:{}", file.display()))
            .args(["--dir".as_ref(), tmp.path().join("d3").as_os_str()]),
        EXIT_TIMEOUT,
    );
    assert!(!st.success(), "a server started on a regular file: {err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    drop(c);
}

#[test]
fn restart_under_pipelined_unix_load_keeps_every_reply_in_order() {
    let (c, sock) = unix_cluster(2, &[]);
    let results = pipelined_restarts_on(&c, || Rpc::connect_unix(&sock), 6, 8, 2, true);
    assert_pipelined_ok(&results, 3);
}

#[test]
fn unix_clients_holding_partial_requests_cross_a_restart() {
    let (c, sock) = unix_cluster(2, &[]);
    let mut conns: Vec<Rpc> = (0..6).map(|_| Rpc::connect_unix(&sock)).collect();
    let reqs: Vec<Vec<u8>> = (0..conns.len()).map(|i| frame(&ping_req(&json!({"half": i})))).collect();
    for (i, r) in conns.iter_mut().enumerate() {
        r.ping(&json!(i)); // served: it sits in a worker
        let f = &reqs[i];
        r.send_raw(&f[..(i % (f.len() - 1)) + 1]); // 1 byte up to all but one
    }
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    for (i, r) in conns.iter_mut().enumerate() {
        let f = &reqs[i];
        r.send_raw(&f[(i % (f.len() - 1)) + 1..]);
        assert_eq!(r.recv(), json!({"out": "pong", "result": {"half": i}}), "connection {i}");
        assert_eq!(r.whoami()["gen"], json!(2), "connection {i} moved to generation 2");
    }
}

#[test]
fn hup_restart_keeps_the_unix_socket_inode_and_no_connect_fails() {
    let (c, sock) = unix_cluster(2, &[]);
    let ino = inode_of(&sock);
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let errors = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let r = Rpc::try_connect_unix(&sock).map_err(|e| e.to_string()).and_then(|mut r| {
                    r.send(&ping_req(&json!("hup")));
                    r.try_recv()
                });
                match r {
                    Ok(Some(v)) if v == json!({"out": "pong", "result": "hup"}) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.lock().unwrap().push(format!("{other:?}"));
                    }
                }
            }
        });
        assert!(poll_until(Duration::from_secs(10), || ok.load(Ordering::Relaxed) >= 20), "the connect loop runs");
        let before = ok.load(Ordering::Relaxed);
        c.server.signal(libc::SIGHUP);
        c.wait_status("generation 2 after HUP", Duration::from_secs(15), |v| {
            v["gen"] == json!(2) && v["restarting"] == json!(false)
        });
        let target = ok.load(Ordering::Relaxed) + 20;
        assert!(poll_until(Duration::from_secs(10), || ok.load(Ordering::Relaxed) >= target), "served after HUP");
        stop.store(true, Ordering::Relaxed);
        eprintln!("connects: {} before HUP, {} in all", before, ok.load(Ordering::Relaxed));
    });
    assert_eq!(failed.load(Ordering::Relaxed), 0, "connects failed during the restart: {:?}", errors.lock().unwrap());
    assert_eq!(inode_of(&sock), ino, "the socket file was recreated");
    assert_eq!(Rpc::connect_unix(&sock).whoami()["gen"], json!(2));
}

#[test]
fn node_relays_over_a_unix_link() {
    let tmp = TempDir::new("uln");
    let sb = tmp.path().join("b.sock");
    let b = Node::start("B", 0, 2, &[], &["--listen", &format!("unix:{}", sb.display())]);
    let a = Node::start("A", 0, 2, &[], &["--peers", &format!("B=unix:{}", sb.display())]);
    let b_pids = b.c.worker_pids();
    let mut ca = a.c.connect();
    for (w, &pid) in b_pids.iter().enumerate() {
        let msg = json!({"over": "unix", "to": w});
        let r = ca.call(&relay_req("B", w, &msg));
        assert_eq!(assert_relayed(&r, "B", w, &msg), pid as u64, "relay answered by B's worker {w}");
    }
    // Pipelined relays keep their order over the Unix link.
    let mut bytes = Vec::new();
    for i in 0..100 {
        bytes.extend(frame(&relay_req("B", 1, &json!(i))));
    }
    ca.send_raw(&bytes);
    for i in 0..100 {
        assert_relayed(&ca.recv(), "B", 1, &json!(i));
    }
    let who = ca.whoami()["worker"].as_u64().unwrap() as usize;
    // Workers report their links with their stats, every so often.
    a.c.wait_status("A's link to B:1 up", Duration::from_secs(10), |v| {
        Node::link(v, who, "B", 1).is_some_and(|l| l["state"] == "up")
    });
    // A client on B's Unix listener is a plain client of B.
    let mut cb = Rpc::connect_unix(&sb);
    assert_eq!(cb.whoami()["node"], "B");
}

/// Forks a child that becomes uid/gid 65534 and connects a stream socket
/// to `path`: its exit code is 10 if refused with EACCES, 12 if
/// connected, 2x on setup errors or another connect error.
fn stranger_connect(path: &Path) -> i32 {
    stranger_probe(path, libc::SOCK_STREAM, &[])
}

#[test]
fn another_uid_cannot_connect_to_a_0600_listener() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED another_uid_cannot_connect_to_a_0600_listener: needs root to become uid 65534");
        return;
    }
    // The sockets live in a directory anyone may enter: only their own
    // mode decides.
    let open = TempDir::new("ulp");
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = open.path().join("private.sock");
    let shared = open.path().join("shared.sock");
    let a = Node::start("P", 0, 1, &[], &["--listen", &format!("unix:{}", private.display())]);
    let b = Node::start("Q", 0, 1, &[], &["--listen", &format!("unix:{}", shared.display()), "--listen-mode", "0666"]);
    assert_eq!(mode_of(&private), 0o600);
    assert_eq!(mode_of(&shared), 0o666);
    assert_eq!(stranger_connect(&private), 10, "uid 65534 connected to a 0600 listener");
    assert_eq!(stranger_connect(&shared), 12, "uid 65534 could not connect to a 0666 listener (the check is void)");
    // We (its owner) still can.
    Rpc::connect_unix(&private).ping(&json!("owner"));
    drop((a, b));
}

#[test]
fn bad_listen_addresses_are_refused_at_start() {
    for (arg, why) in [("127.0.0.1", "HOST:PORT"), ("::1:80", "brackets"), ("unix:", "path"), ("h:99999", "port")] {
        let tmp = TempDir::new("ulb");
        let (st, _out, err) = run_cmd(
            Command::new(bin()).args(["cluster", "--listen", arg, "--dir"]).arg(tmp.path().join("d")),
            EXIT_TIMEOUT,
        );
        assert_eq!(st.code(), Some(2), "--listen {arg}: {err}");
        assert!(err.contains(why), "--listen {arg}: {err}");
    }
    let tmp = TempDir::new("ulb");
    let (st, _out, err) =
        run_cmd(Command::new(bin()).args(["cluster", "--dir"]).arg(tmp.path().join("d")), EXIT_TIMEOUT);
    assert_eq!(st.code(), Some(2), "no --port, no --listen: {err}");
    let (st, _out, err) = run_cmd(
        Command::new(bin())
            .args(["cluster", "--port", "0", "--listen-mode", "0999", "--dir"])
            .arg(tmp.path().join("d")),
        EXIT_TIMEOUT,
    );
    assert_eq!(st.code(), Some(2), "{err}");
    let _ = std::io::stderr().flush();
}

#[test]
fn shared_policy_workers_accept_on_every_listener() {
    let (c, sock) = unix_cluster(2, &["--policy", "shared"]);
    let mut u = Rpc::connect_unix(&sock);
    u.ping(&json!("shared unix"));
    let mut t = c.connect();
    t.ping(&json!("shared tcp"));
    let pids = c.worker_pids();
    for mut r in [u, t] {
        let who = r.whoami();
        assert!(pids.contains(&(who["pid"].as_u64().unwrap() as i32)), "{who} served by a worker {pids:?}");
    }
    // A restart hands both listening sockets to the new workers.
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    assert_eq!(Rpc::connect_unix(&sock).whoami()["gen"], json!(2));
    assert_eq!(c.connect().whoami()["gen"], json!(2));
}

#[test]
fn max_conns_pauses_every_listener() {
    let (c, sock) = unix_cluster(2, &["--max-conns", "2"]);
    let mut held: Vec<Rpc> = (0..2).map(|_| Rpc::connect_unix(&sock)).collect();
    for (i, r) in held.iter_mut().enumerate() {
        r.ping(&json!(i));
    }
    c.wait_status("the limit reached", Duration::from_secs(10), |v| v["at_limit"] == json!(true));
    // Both kinds wait in their backlogs now.
    let mut tcp = c.connect();
    tcp.send(&ping_req(&json!("tcp")));
    let mut unix = Rpc::connect_unix(&sock);
    unix.send(&ping_req(&json!("unix")));
    assert!(tcp.nothing_pending(Duration::from_millis(300)), "a TCP client served over --max-conns");
    assert!(unix.nothing_pending(Duration::from_millis(300)), "a Unix client served over --max-conns");
    // Closing the held ones lets both in.
    held.clear();
    assert_eq!(tcp.recv(), json!({"out": "pong", "result": "tcp"}));
    assert_eq!(unix.recv(), json!({"out": "pong", "result": "unix"}));
}

/// Pair mode over Unix sockets: `handoff pair --listen unix:D/pp.{port}.sock`
/// gives each server its own socket beside its TCP port; requests
/// alternate between the servers over either; the C client and the
/// Rust client both pass; a HUP restarts a server in place keeping its
/// socket file (same inode) and a connection held over it.
#[test]
fn pair_servers_serve_over_their_own_unix_sockets_and_keep_them_across_hup() {
    let tmp = TempDir::new("pairux");
    let dir = tmp.path().join("d");
    let p = free_pair();
    let q = p + 1;
    let template = format!("unix:{}/pp.{{port}}.sock", tmp.path().display());
    let ports = format!("{p},{q}");
    let l = TestServer::start(
        "pair",
        [
            "pair",
            "--ports",
            &ports,
            "--dir",
            &dir.display().to_string(),
            "--listen",
            &template,
            "--listen-mode",
            "0660",
        ],
    );
    let path = |port: u16| tmp.path().join(format!("pp.{port}.sock"));
    for port in [p, q] {
        assert!(poll_until(Duration::from_secs(5), || path(port).exists()), "no {}", path(port).display());
        assert_eq!(mode_of(&path(port)), 0o660);
    }
    let s = handoff::client::unary(&handoff::client::PingPongOpts { unix: Some(path(p)), ..opts(p, 20, 100, 16) });
    assert!(s.passed() && s.errors == 0 && s.breaks == 0, "unary over unix: {s}");
    // Both request logs name this process as the client: unix:PID.
    let me = format!(" unix:{} ", std::process::id());
    for port in [p, q] {
        let log = dir.join(format!("{port}.log"));
        let named = poll_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.lines().filter(|l| l.contains(&me)).count() >= 1000)
        });
        assert!(named, "{} does not name the client{me}(1000 requests each)", log.display());
    }
    let (st, out, err) = run_cmd(
        Command::new(env!("CARGO_MANIFEST_DIR").to_string() + "/build/cclient")
            .arg("stream")
            .arg(format!("unix:{}", path(q).display()))
            .args(["10", "100"]),
        Duration::from_secs(30),
    );
    assert!(st.success(), "cclient stream over unix: {st}\n{out}\n{err}");
    assert!(out.contains("errors=0") && out.contains("breaks=0"), "{out}");

    // A held connection over A's socket, half a request sent, across a HUP of A.
    let before = inode_of(&path(p));
    let mut held = std::os::unix::net::UnixStream::connect(path(p)).unwrap();
    held.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let req = request(16, 7);
    held.write_all(&req[..5]).unwrap();
    let a_pid = {
        let text = l.stderr_text();
        let line = text.lines().find(|x| x.contains(&format!("server {p} (pid "))).expect("server line").to_string();
        line.split("(pid ").nth(1).and_then(|r| r.split(')').next()).and_then(|n| n.parse::<i32>().ok()).unwrap()
    };
    kill_pid(a_pid, libc::SIGHUP);
    let restarted = poll_until(Duration::from_secs(10), || l.stderr_text().contains("restarted in place by SIGHUP"));
    assert!(restarted, "{}", l.stderr_text());
    assert_eq!(inode_of(&path(p)), before, "the socket file was recreated");
    held.write_all(&req[5..]).unwrap();
    let mut resp = [0u8; 2];
    std::io::Read::read_exact(&mut held, &mut resp).expect("the held connection's reply after the HUP");
    let s = handoff::client::unary(&handoff::client::PingPongOpts { unix: Some(path(p)), ..opts(p, 5, 20, 16) });
    assert!(s.passed() && s.errors == 0, "after the HUP: {s}");
    drop(l);
}

/// At scale: 3000 keep-alive clients on the Unix listener, a third of
/// them holding half a request, across a restart: every one is answered
/// by the new generation, the half requests completed, none lost.
#[test]
fn three_thousand_unix_clients_cross_a_restart() {
    const N: usize = 3000;
    let nofile = handoff::core::sock::raise_nofile().expect("raise RLIMIT_NOFILE");
    assert!(nofile >= 3500, "RLIMIT_NOFILE {nofile} is too low for {N} connections");
    let (c, sock) = unix_cluster(2, &[]);
    let mut conns: Vec<Rpc> = (0..N).map(|_| Rpc::connect_unix(&sock)).collect();
    for (i, r) in conns.iter_mut().enumerate() {
        r.ping(&json!({"before": i}));
    }
    let halves: Vec<Vec<u8>> = (0..N / 3).map(|i| frame(&ping_req(&json!({"half": i})))).collect();
    for (i, f) in halves.iter().enumerate() {
        conns[i].send_raw(&f[..f.len() / 2]);
    }
    c.wait_status("every connection open", Duration::from_secs(10), |v| sum_field(v, "open") == N as u64);
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    for (i, f) in halves.iter().enumerate() {
        conns[i].send_raw(&f[f.len() / 2..]);
        assert_eq!(conns[i].recv(), json!({"out": "pong", "result": {"half": i}}), "half request {i}");
    }
    for (i, r) in conns.iter_mut().enumerate() {
        r.ping(&json!({"after": i}));
    }
    let v = c.status();
    assert_eq!(sum_field(&v, "open"), N as u64, "{v}");
    for i in (0..N).step_by(97) {
        assert_eq!(conns[i].whoami()["gen"], json!(2), "connection {i}");
    }
}
