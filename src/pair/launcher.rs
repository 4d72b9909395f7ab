//! `handoff pair`: runs both servers of a pair as two child processes,
//! forwards SIGINT/SIGTERM to them and exits when both are gone.
use std::cell::RefCell;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;

use crate::reactor::{Base, Event, Interest};

pub fn run(exe: &Path, ports: (u16, u16), dir: &Path, host: &str, log_args: &[String]) -> io::Result<()> {
    let base = Base::new()?;
    let mut children = Vec::new();
    let mut outs = Vec::new();
    for (me, peer) in [(ports.0, ports.1), (ports.1, ports.0)] {
        let mut child = Command::new(exe)
            .args(["server", "--port", &me.to_string(), "--peer-port", &peer.to_string(), "--host", host])
            .arg("--dir")
            .arg(dir)
            .args(log_args)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let line = next_line(&mut out);
        if !line.starts_with("ready") {
            let _ = child.kill();
            let _ = child.wait();
            for c in &mut children {
                stop(c);
            }
            return Err(io::Error::other(format!("server on port {me} did not start")));
        }
        log::info!("server {me} (pid {}) {}", child.id(), line.trim_end());
        children.push(child);
        outs.push(out);
    }
    // Ready means both are linked: a client never sees a server alone.
    for (out, port) in outs.iter_mut().zip([ports.0, ports.1]) {
        let line = next_line(out);
        if !line.starts_with("linked") {
            for c in &mut children {
                stop(c);
            }
            return Err(io::Error::other(format!("server on port {port} did not link to its peer")));
        }
    }
    crate::signals::ready(&format!("ready ports={},{} dir={}", ports.0, ports.1, dir.display()));

    let children = Rc::new(RefCell::new(children));
    let mut events = Vec::new();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let c = children.clone();
        let e = Event::new(&base, sig, Interest::Signal, move || {
            for child in c.borrow_mut().iter() {
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
        })?;
        e.add(None)?;
        events.push(e);
    }
    let (c, b) = (children.clone(), base.clone());
    let chld = Event::new(&base, libc::SIGCHLD, Interest::Signal, move || {
        let mut all_gone = true;
        for child in c.borrow_mut().iter_mut() {
            match child.try_wait() {
                Ok(Some(st)) => log::info!("server pid {} exited: {st}", child.id()),
                _ => all_gone = false,
            }
        }
        if all_gone {
            b.exit(None);
        }
    })?;
    chld.add(None)?;
    events.push(chld);
    base.dispatch()?;
    drop(events);
    for c in children.borrow_mut().iter_mut() {
        stop(c);
    }
    Ok(())
}

fn stop(c: &mut Child) {
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

/// The next stdout line of a server ("" at EOF).
fn next_line(out: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    line
}
