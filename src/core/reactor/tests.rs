use super::*;
use crate::core::sock;
use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::Duration;

fn nonblocking_pair() -> (UnixStream, OwnedFd) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    (a, OwnedFd::from(b))
}

/// Fails the test instead of hanging when no event ends the loop.
fn watchdog(base: &Base) -> Event {
    let e = Event::new(base, -1, Interest::Timer, || panic!("reactor test timed out")).unwrap();
    e.add(Some(Duration::from_secs(10))).unwrap();
    e
}

#[test]
fn timer_fires_and_loop_exits() {
    let base = Base::new().unwrap();
    assert_eq!(base.method(), "epoll");
    let fired = Rc::new(Cell::new(0));
    let (f, b) = (fired.clone(), base.clone());
    let t = Event::new(&base, -1, Interest::Timer, move || {
        f.set(f.get() + 1);
        b.exit(None);
    })
    .unwrap();
    t.add(Some(Duration::from_millis(1))).unwrap();
    assert!(t.pending());
    let _dog = watchdog(&base);
    base.dispatch().unwrap();
    assert_eq!(fired.get(), 1);
    assert!(!t.pending());
}

#[test]
fn panic_in_a_callback_resumes_after_dispatch() {
    let base = Base::new().unwrap();
    let t = Event::new(&base, -1, Interest::Timer, || panic!("boom")).unwrap();
    t.add(Some(Duration::ZERO)).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| base.dispatch()));
    let msg = r.unwrap_err().downcast::<&str>().map(|s| *s).unwrap_or("");
    assert_eq!(msg, "boom");
}

#[test]
fn conn_serves_leftover_first_and_detach_returns_unread_input() {
    let base = Base::new().unwrap();
    let (mut peer, fd) = nonblocking_pair();
    let events: Rc<RefCell<Vec<ConnEvent>>> = Rc::default();
    let (ev, b) = (events.clone(), base.clone());
    let mut conn = Conn::adopt(
        &base,
        fd,
        b"left",
        1024,
        Rc::new(move |e| {
            ev.borrow_mut().push(e);
            b.exit(None);
        }),
    )
    .unwrap();
    assert_eq!(conn.input_len(), 4);
    assert_eq!(conn.peek(4), b"left");
    conn.resume_reading();
    peer.write_all(b"over").unwrap();
    let _dog = watchdog(&base);
    base.dispatch().unwrap();
    assert_eq!(events.borrow().first(), Some(&ConnEvent::Read));
    assert_eq!(conn.peek(8), b"leftover");
    conn.consume(4);
    assert!(conn.write_now(b"reply").unwrap());
    let (fd, leftover) = conn.detach();
    assert_eq!(leftover, b"over");
    // The descriptor still works after the bufferevent is gone.
    let mut back = UnixStream::from(fd);
    back.write_all(b"!").unwrap();
    let mut got = [0u8; 6];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply!");
}

#[test]
fn conn_reports_drained_then_eof() {
    let base = Base::new().unwrap();
    let (mut peer, fd) = nonblocking_pair();
    let events: Rc<RefCell<Vec<ConnEvent>>> = Rc::default();
    let ev = events.clone();
    let b = base.clone();
    let conn = Conn::adopt(
        &base,
        fd,
        b"",
        1024,
        Rc::new(move |e| {
            ev.borrow_mut().push(e);
            b.exit(None);
        }),
    )
    .unwrap();
    conn.resume_reading();
    conn.write(b"queued");
    let _dog = watchdog(&base);
    base.dispatch().unwrap();
    assert_eq!(*events.borrow(), [ConnEvent::Drained]);
    let mut got = [0u8; 6];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"queued");
    drop(peer);
    base.dispatch().unwrap();
    assert_eq!(*events.borrow(), [ConnEvent::Drained, ConnEvent::Eof]);
}

#[test]
fn conn_has_a_bufferevent_only_while_it_holds_bytes() {
    let base = Base::new().unwrap();
    let (mut peer, fd) = nonblocking_pair();
    let events: Rc<RefCell<Vec<ConnEvent>>> = Rc::default();
    let (ev, b) = (events.clone(), base.clone());
    let mut conn = Conn::adopt(
        &base,
        fd,
        b"",
        1 << 20,
        Rc::new(move |e| {
            ev.borrow_mut().push(e);
            b.exit(None);
        }),
    )
    .unwrap();
    assert!(!conn.has_bufferevent());
    conn.resume_reading();
    // Part of a request: kept.
    peer.write_all(b"partial").unwrap();
    let _dog = watchdog(&base);
    base.dispatch().unwrap();
    assert_eq!(conn.peek(7), b"partial");
    assert!(conn.has_bufferevent());
    conn.consume(7);
    assert_eq!((conn.input_len(), conn.has_bufferevent()), (0, false));
    // Output the socket does not take at once waits, then leaves; the
    // bufferevent is freed once drained.
    let big = vec![7u8; 4 << 20];
    assert!(!conn.write_now(&big).unwrap());
    assert!(conn.output_len() > 0 && conn.has_bufferevent());
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 4 << 20];
        peer.read_exact(&mut got).unwrap();
        got.iter().all(|&b| b == 7)
    });
    events.borrow_mut().clear();
    base.dispatch().unwrap();
    assert_eq!(*events.borrow(), [ConnEvent::Drained]);
    assert!(reader.join().unwrap());
    assert_eq!((conn.output_len(), conn.has_bufferevent()), (0, false));
}

#[test]
fn listener_accepts_and_removes_its_socket_file() {
    let dir = std::env::temp_dir().join(format!("handoff-reactor-{}", std::process::id()));
    sock::private_dir(&dir).unwrap();
    let path = dir.join("l.sock");
    let base = Base::new().unwrap();
    let accepted = Rc::new(Cell::new(0));
    let (a, b) = (accepted.clone(), base.clone());
    let l = Listener::bind(&base, &Endpoint::Seqpacket(path.clone()), move |_fd| {
        a.set(a.get() + 1);
        b.exit(None);
    })
    .unwrap();
    let _c = sock::unix_connect(&path).unwrap();
    let _dog = watchdog(&base);
    base.dispatch().unwrap();
    assert_eq!(accepted.get(), 1);
    drop(l);
    assert!(!path.exists());
    std::fs::remove_dir(&dir).unwrap();
}
