use super::*;
use crate::sock;
use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// Runs the loop with a watchdog so a broken test fails instead of hanging.
fn run(base: &Base) {
    let b = base.clone();
    let dog = Event::new(base, -1, Interest::Timer, move || panic!("channel test timed out")).unwrap();
    dog.add(Some(Duration::from_secs(10))).unwrap();
    base.dispatch().unwrap();
    let _ = b;
}

#[test]
fn connection_moves_with_its_leftover_and_is_acknowledged() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let got: Rc<RefCell<Vec<Msg>>> = Rc::default();
    let g = got.clone();
    let bs = base.clone();
    let tx = Channel::new(&base, a, |_| {}).unwrap();
    let _rx = Channel::new(&base, b, move |ev| {
        if let ChannelEvent::Msg(m) = ev {
            g.borrow_mut().push(m);
            bs.exit(Some(Duration::from_millis(20)));
        }
    })
    .unwrap();
    let (mut client, server) = UnixStream::pair().unwrap();
    tx.send(Msg::conn(OwnedFd::from(server), b"left".to_vec(), wire::FLAG_EOF)).unwrap();
    assert_eq!(tx.in_flight(), 1);
    run(&base);
    let m = got.borrow_mut().pop().expect("message delivered");
    assert_eq!((m.kind, m.flags, m.body.as_slice()), (KIND_CONN, wire::FLAG_EOF, &b"left"[..]));
    // The sender dropped its copy after the ACK.
    assert_eq!(tx.in_flight(), 0);
    assert_eq!(tx.stats().conns_acked, 1);
    let mut moved = UnixStream::from(m.fd.unwrap());
    moved.write_all(b"hi").unwrap();
    let mut buf = [0u8; 2];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");
}

#[test]
fn full_socket_queues_and_delivers_everything_in_order() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let seen: Rc<RefCell<Vec<u64>>> = Rc::default();
    let s = seen.clone();
    let bs = base.clone();
    const N: u64 = 400;
    let tx = Channel::new(&base, a, |_| {}).unwrap();
    let _rx = Channel::new(&base, b, move |ev| {
        if let ChannelEvent::Msg(m) = ev {
            let n = u64::from_le_bytes(m.body[..8].try_into().unwrap());
            s.borrow_mut().push(n);
            if n == N - 1 {
                bs.exit(None);
            }
        }
    })
    .unwrap();
    for n in 0..N {
        let mut body = n.to_le_bytes().to_vec();
        body.resize(32 * 1024, 0);
        tx.send(Msg::control(wire::KIND_USER, body)).unwrap();
    }
    assert!(tx.in_flight() > 0, "32 KiB x 400 must overflow the socket buffer");
    run(&base);
    assert_eq!(*seen.borrow(), (0..N).collect::<Vec<_>>());
}

#[test]
fn unacknowledged_connections_come_back_when_the_peer_goes() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let back: Rc<RefCell<Option<Vec<Msg>>>> = Rc::default();
    let k = back.clone();
    let bs = base.clone();
    let tx = Channel::new(&base, a, move |ev| {
        if let ChannelEvent::Closed { returned, .. } = ev {
            *k.borrow_mut() = Some(returned);
            bs.exit(None);
        }
    })
    .unwrap();
    let (_c1, s1) = UnixStream::pair().unwrap();
    tx.send(Msg::conn(OwnedFd::from(s1), b"x".to_vec(), 0)).unwrap();
    drop(b); // the peer dies without reading
    run(&base);
    let back = back.borrow_mut().take().expect("Closed delivered");
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].body, b"x");
    assert!(!tx.is_open());
    let m = Msg::control(wire::KIND_USER, vec![]);
    assert!(tx.send(m).is_err(), "a closed channel gives messages back");
}

/// Sends `raw` (no descriptor) to a fresh channel; returns why it closed.
fn close_reason(raw: &[u8]) -> Option<String> {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let reason: Rc<RefCell<Option<String>>> = Rc::default();
    let r = reason.clone();
    let bs = base.clone();
    let _rx = Channel::new(&base, b, move |ev| {
        if let ChannelEvent::Closed { reason, .. } = ev {
            *r.borrow_mut() = reason.map(|e| e.to_string());
            bs.exit(None);
        }
    })
    .unwrap();
    fdpass::send(a.as_fd(), None, raw).unwrap();
    run(&base);
    let why = reason.borrow().clone();
    why
}

#[test]
fn malformed_message_closes_the_channel_with_a_reason() {
    assert_eq!(close_reason(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n----------").as_deref(), Some("bad magic"));
}

#[test]
fn newer_version_is_refused() {
    let mut m = Vec::new();
    Header { version: wire::VERSION + 1, kind: wire::KIND_USER, flags: 0, body_len: 0, id: 0, meta: 0 }.encode(&mut m);
    let why = close_reason(&m).unwrap();
    assert!(why.contains("v2"), "{why}");
}
