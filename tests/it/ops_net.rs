//! Operations, network side: IPv6 (`--host ::1`, the dual-stack `::`,
//! node peers in brackets, IPv6 clients in the pair request log) and
//! `--user` (workers of a root master run as another user).
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::cluster_support::*;
use crate::support::*;

/// Whether this machine has an IPv6 loopback (binds `[::1]:0`); if not,
/// says that `test` is skipped.
fn have_ipv6(test: &str) -> bool {
    match TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: this machine has no IPv6 loopback (bind [::1]:0: {e})");
            false
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, port))
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The (real, effective, saved, fs) uids or gids of a process: `field`
/// is `Uid` or `Gid` in /proc/PID/status.
fn proc_ids(pid: i32, field: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("pid {pid}: {e}"));
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:"))).expect("status line");
    line.split_whitespace().skip(1).map(|x| x.parse().expect("an id")).collect()
}

// --------------------------------------------------------------------- IPv6

#[test]
fn cluster_on_ipv6_loopback_serves_and_restarts_with_live_v6_connections() {
    if !have_ipv6("cluster_on_ipv6_loopback_serves_and_restarts_with_live_v6_connections") {
        return;
    }
    let c = Cluster::start(2, &["--host", "::1"]);
    let logged = format!("on [::1]:{}", c.port);
    // stderr is read by a thread of its own: the line may trail the ready line.
    let seen = poll_until(Duration::from_secs(5), || c.server.stderr_text().contains(&logged));
    assert!(seen, "no '{logged}' in the master's log:\n{}", c.server.stderr_text());
    // Four live connections over IPv6, one of them with half a request
    // sent when the restart begins.
    let mut kept: Vec<Rpc> = (0..4).map(|_| Rpc::connect_addr(v6(c.port))).collect();
    for (i, r) in kept.iter_mut().enumerate() {
        r.ping(&json!(i));
        assert_eq!(r.whoami()["gen"], json!(1));
    }
    let half = frame(&ping_req(&json!("half")));
    kept[3].send_raw(&half[..5]);
    // Load from the library client over IPv6 while the restart runs.
    let opts = handoff::client::RpcOpts {
        host: "::1".into(),
        port: c.port,
        conns: 4,
        requests: 3000,
        short: false,
        relay: None,
        unix: None,
    };
    let load = std::thread::spawn(move || handoff::client::rpc(&opts));
    c.wait_status("the load under way", Duration::from_secs(20), |v| sum_field(v, "served") >= 300);
    // `handoff restart` checks the new generation answers on [::1]:port.
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    let s = load.join().expect("load thread");
    assert!(s.passed() && s.errors == 0, "IPv6 requests failed across the restart: {s}");
    kept[3].send_raw(&half[5..]);
    assert_eq!(kept[3].recv(), json!({"out": "pong", "result": "half"}), "the half-sent request moved");
    for (i, r) in kept.iter_mut().enumerate() {
        r.ping(&json!(i));
        assert_eq!(r.whoami()["gen"], json!(2), "kept IPv6 connection {i} is served by generation 2");
    }
    assert_eq!(Rpc::connect_addr(v6(c.port)).whoami()["gen"], json!(2));
}

#[test]
fn any_ipv6_address_takes_ipv4_and_ipv6_clients() {
    if !have_ipv6("any_ipv6_address_takes_ipv4_and_ipv6_clients") {
        return;
    }
    let c = Cluster::start(1, &["--host", "::"]);
    for addr in [v6(c.port), v4(c.port)] {
        let mut r = Rpc::connect_addr(addr);
        r.ping(&json!(addr.to_string()));
        assert_eq!(r.whoami()["worker"], json!(0), "client from {addr}");
    }
    // The CLI load client takes an IPv6 host, bracketed or not.
    for host in ["::1", "[::1]", "127.0.0.1"] {
        let mut cmd = Command::new(bin());
        cmd.args(["client", "rpc", "--host", host, "--port", &c.port.to_string(), "--conns", "2", "--requests", "20"]);
        let (st, out, err) = run_cmd(&mut cmd, Duration::from_secs(30));
        assert!(st.success() && out.contains("ok=40 errors=0"), "client rpc --host {host}: {st}\n{out}{err}");
    }
    let (gen, _) = c.restart_ok(); // the probe reaches `::` on loopback
    assert_eq!(gen, 2);
    assert_eq!(Rpc::connect_addr(v4(c.port)).whoami()["gen"], json!(2));
}

/// One pingpong request over `s`; returns the port that answered.
fn pingpong(s: &mut BufReader<TcpStream>) -> u16 {
    s.get_mut().write_all(&request(16, b'x')).expect("write");
    let mut line = Vec::new();
    s.take(64).read_until(b'\n', &mut line).expect("read");
    handoff::client::pingpong::parse_response(&line).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn pair_on_ipv6_logs_the_ipv6_client_on_both_servers() {
    if !have_ipv6("pair_on_ipv6_logs_the_ipv6_client_on_both_servers") {
        return;
    }
    let tmp = TempDir::new("p6");
    let dir = tmp.path().join("d");
    let (p, q) = {
        let p = free_pair();
        (p, p + 1)
    };
    let server = |port: u16, peer: u16| {
        let args = ["server", "--host", "::1", "--port", &port.to_string(), "--peer-port", &peer.to_string(), "--dir"];
        let mut cmd = Command::new(bin());
        cmd.args(args).arg(&dir);
        TestServer::start_cmd(&format!("server {port}"), cmd)
    };
    let mut a = server(p, q);
    let mut b = server(q, p);
    // Our own connection: its address must reach both logs, the second
    // server's through the handoff channel (it never accepted it).
    let mut s = BufReader::new(TcpStream::connect(v6(p)).expect("connect [::1]"));
    s.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let me = s.get_ref().local_addr().unwrap();
    assert!(me.is_ipv6(), "{me}");
    let mut seen = Vec::new();
    let linked = poll_until(Duration::from_secs(10), || {
        seen.push(pingpong(&mut s));
        seen.ends_with(&[p, q, p])
    });
    assert!(linked, "the servers did not hand the IPv6 connection back and forth: ports {seen:?}");
    // The load client over IPv6 sees strict alternation too.
    let opts =
        handoff::client::PingPongOpts { host: "::1".into(), port: p, conns: 4, requests: 50, size: 16, unix: None };
    let sum = handoff::client::unary(&opts);
    assert!(sum.passed() && sum.errors == 0 && sum.breaks == 0, "{sum}");
    drop(s);
    for srv in [&mut a, &mut b] {
        let st = srv.terminate();
        assert!(st.success(), "{}: {st}", srv.name());
    }
    let mut mine = [0usize; 2];
    for (i, port) in [p, q].into_iter().enumerate() {
        let path = dir.join(format!("{port}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.lines().count() > 100, "{}: {} lines", path.display(), text.lines().count());
        for line in text.lines() {
            let addr: SocketAddr = line
                .split(' ')
                .nth(1)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("{}: malformed {line:?}", path.display()));
            assert_eq!(addr.ip(), Ipv6Addr::LOCALHOST, "{}: {line:?}", path.display());
            mine[i] += usize::from(addr == me);
        }
    }
    assert!(mine[0] >= 2 && mine[1] >= 1, "our client {me} logged {mine:?} times by {p} and {q}");
}

#[test]
fn nodes_on_ipv6_relay_through_bracketed_peers() {
    if !have_ipv6("nodes_on_ipv6_relay_through_bracketed_peers") {
        return;
    }
    let (pa, pb) = (free_port(), free_port());
    let start = |name: &str, port: u16, peer: &str, peer_port: u16| {
        let tmp = TempDir::new(&format!("n6{name}"));
        let dir = tmp.path().join("d");
        let mut args: Vec<String> = ["node", "--name", name, "--host", "::1", "--port", &port.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--workers".into(), "1".into(), "--dir".into(), dir.display().to_string()]);
        args.extend(["--peers".into(), format!("{peer}=[::1]:{peer_port}")]);
        Cluster::launch(&format!("node {name}"), tmp, dir, 1, args)
    };
    let a = start("A", pa, "B", pb);
    let b = start("B", pb, "A", pa);
    let mut ca = Rpc::connect_addr(v6(a.port));
    assert_eq!(ca.whoami()["node"], "A");
    let msg = json!({"over": "IPv6"});
    let pid = assert_relayed(&ca.call(&relay_req("B", 0, &msg)), "B", 0, &msg);
    assert_eq!(pid, b.worker_pids()[0] as u64);
    let mut cb = Rpc::connect_addr(v6(b.port));
    assert_relayed(&cb.call(&relay_req("A", 0, &msg)), "A", 0, &msg);
    // A peer's IPv6 address without brackets is refused at start.
    let mut cmd = Command::new(bin());
    cmd.args(["node", "--name", "C", "--port", "0", "--dir"]).arg(a.dir.join("c")).args(["--peers", "A=::1:7000"]);
    let (st, _, err) = run_cmd(&mut cmd, Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("A=[::1]:7000"), "the error shows the bracketed form: {err}");
}

// ------------------------------------------------------------------- --user

/// Makes `cmd` run as uid/gid 65534 (nobody), no supplementary groups.
fn as_nobody(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only
    // makes the setgroups, setgid and setuid syscalls.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn user_nobody_runs_every_worker_as_nobody() {
    if !is_root() {
        eprintln!("SKIPPED user_nobody_runs_every_worker_as_nobody: needs root (a master switches users only as root)");
        return;
    }
    let nobody = handoff::core::user::RunAs::lookup("nobody").expect("user nobody");
    let c = Cluster::start(2, &["--user", "nobody"]);
    assert_eq!(proc_ids(c.master_pid(), "Uid"), [0; 4], "the master stays root");
    let check = |what: &str| {
        for pid in c.worker_pids() {
            assert_eq!(proc_ids(pid, "Uid"), [nobody.uid; 4], "{what}: worker {pid} uids");
            assert_eq!(proc_ids(pid, "Gid"), [nobody.gid; 4], "{what}: worker {pid} gids");
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
            assert!(!groups.split_whitespace().any(|g| g == "0"), "{what}: worker {pid} kept root's group: {groups}");
        }
    };
    check("at start");
    let mut kept = c.connect();
    kept.ping(&json!("as nobody"));
    // A respawned worker, and the workers of the next generation, too.
    let old = c.worker_pids();
    kill_pid(old[0], libc::SIGKILL);
    c.wait_status("worker 0 respawned", Duration::from_secs(10), |v| {
        v["workers"][0]["pid"].as_i64().is_some_and(|p| p as i32 != old[0]) && v["workers"][0]["state"] == "up"
    });
    check("after a respawn");
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    check("generation 2");
    kept.ping(&json!("moved"));
    assert_eq!(kept.whoami()["gen"], json!(2));
}

#[test]
fn user_unknown_is_an_error_at_start() {
    let tmp = TempDir::new("nouser");
    let dir = tmp.path().join("d");
    let mut cmd = Command::new(bin());
    cmd.args(["cluster", "--port", "0", "--workers", "1", "--user", "handoff-no-such-user", "--dir"]).arg(&dir);
    let (st, out, err) = run_cmd(&mut cmd, Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("--user handoff-no-such-user: no such user"), "{err}");
    assert!(!out.contains("ready"), "{out}");
    assert!(!dir.exists(), "nothing is made before the user is checked");
}

#[test]
fn user_switch_needs_root_unless_already_that_user() {
    if !is_root() {
        eprintln!("SKIPPED user_switch_needs_root_unless_already_that_user: needs root to start a master as nobody");
        return;
    }
    let tmp = TempDir::new("asnobody");
    let dir = tmp.path().join("d");
    // A master running as nobody may not run workers as root.
    let mut cmd = Command::new(bin());
    cmd.args(["cluster", "--port", "0", "--workers", "1", "--user", "root", "--dir"]).arg(&dir);
    as_nobody(&mut cmd);
    let (st, out, err) = run_cmd(&mut cmd, Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("--user root: only a master started as root"), "{err}");
    // As the user it already is, --user changes nothing.
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["cluster", "--port", "0", "--workers", "1", "--user", "nobody", "--dir"]).arg(&dir);
    as_nobody(&mut cmd);
    let server = TestServer::start_cmd("master as nobody", cmd);
    let port: u16 = ready_field(&server.ready, "port").and_then(|p| p.parse().ok()).expect("port");
    let mut r = Rpc::connect_addr(v4(port));
    let pid = r.whoami()["pid"].as_i64().expect("pid") as i32;
    assert_eq!(proc_ids(pid, "Uid"), [65534; 4]);
    assert_eq!(proc_ids(server.pid(), "Uid"), [65534; 4]);
    drop(server); // (the TestServer and its worker go before the directory)
}

#[test]
fn user_old_master_killed_mid_restart_new_generation_serves_unrescued_connections_close() {
    if !is_root() {
        eprintln!(
            "SKIPPED user_old_master_killed_mid_restart_new_generation_serves_unrescued_connections_close: needs root"
        );
        return;
    }
    const IDLE: usize = 20;
    let c = Cluster::start(2, &["--user", "nobody"]);
    let old_master = c.master_pid();
    let old_workers = c.worker_pids();
    let mut idle: Vec<Rpc> = (0..IDLE).map(|_| c.connect()).collect();
    for r in idle.iter_mut() {
        r.ping(&json!("before"));
    }
    // A client that never reads holds the restart open with its worker.
    let (mut stuck, writer) = crate::restart::stuck_client(&c, IDLE);
    let mut restart = ChildGuard::spawn(Command::new(bin()).arg("restart").arg("--dir").arg(&c.dir));
    c.wait_status("the new generation holding the idle connections", Duration::from_secs(10), |v| {
        v["gen"] == json!(2) && sum_field(v, "open") == IDLE as u64
    });
    kill_pid(old_master, libc::SIGKILL);
    let (st, out, _) = restart.wait(Duration::from_secs(10));
    assert!(!st.success(), "handoff restart reported success after the old master was killed: {out}");
    // What had moved is served by generation 2.
    for (i, r) in idle.iter_mut().enumerate() {
        assert_eq!(r.whoami()["gen"], json!(2), "idle connection {i}");
    }
    // The old worker, running as nobody, cannot enter the 0700 directory
    // to hand the rest to the new master: that connection closes at once
    // (not after --grace), and the old workers exit.
    stuck.expect_closed(Duration::from_secs(3)).expect("the unrescued connection closes");
    writer.join().unwrap();
    let ok = poll_until(Duration::from_secs(5), || old_workers.iter().all(|&p| !pid_alive(p)));
    assert!(ok, "old workers outlived their master: {old_workers:?}");
    let log = c.server.stderr_text();
    assert!(log.contains("successor is unreachable") && log.contains("Permission denied"), "{log}");
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 3);
    for pid in c.worker_pids() {
        assert_eq!(proc_ids(pid, "Uid")[0], 65534, "generation 3 worker {pid}");
    }
}
