use super::*;
use crate::core::sock;
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

/// A sending channel on `fd` that keeps what comes back when it closes
/// (`Closed { returned }`) and then stops the loop.
fn sender_keeping_returns(base: &Base, fd: OwnedFd) -> (Channel, Rc<RefCell<Option<Vec<Msg>>>>) {
    let back: Rc<RefCell<Option<Vec<Msg>>>> = Rc::default();
    let (k, bs) = (back.clone(), base.clone());
    let tx = Channel::new(base, fd, move |ev| {
        if let ChannelEvent::Closed { returned, .. } = ev {
            *k.borrow_mut() = Some(returned);
            bs.exit(None);
        }
    })
    .unwrap();
    (tx, back)
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
    let (tx, back) = sender_keeping_returns(&base, a);
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
    Header { version: wire::VERSION + 1, kind: wire::KIND_USER, flags: 0, body_len: 0, id: 0, tag: 0 }.encode(&mut m);
    let why = close_reason(&m).unwrap();
    assert!(why.contains("v2"), "{why}");
}

/// Raw channel message bytes (header + body), as a peer would write them.
fn raw(kind: u16, id: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    Header { version: wire::VERSION, kind, flags: 0, body_len: body.len() as u32, id, tag: 0 }.encode(&mut m);
    m.extend_from_slice(body);
    m
}

/// A CONN and garbage in one receive batch: the CONN has exactly one
/// owner (the receiver, whose ACK got out), never both sides.
#[test]
fn conn_then_garbage_in_one_batch_has_one_owner() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let side_door = a.try_clone().unwrap();
    let delivered: Rc<RefCell<usize>> = Rc::default();
    let d = delivered.clone();
    let (tx, back) = sender_keeping_returns(&base, a);
    let _rx = Channel::new(&base, b, move |ev| {
        if let ChannelEvent::Msg(m) = ev {
            assert_eq!(m.kind, KIND_CONN);
            *d.borrow_mut() += 1;
        }
    })
    .unwrap();
    let (_client, server) = UnixStream::pair().unwrap();
    tx.send(Msg::conn(OwnedFd::from(server), b"ab".to_vec(), 0)).unwrap();
    fdpass::send(side_door.as_fd(), None, b"garbage garbage garbage garbage!!").unwrap();
    drop(side_door);
    run(&base);
    let returned = back.borrow().as_ref().map(Vec::len);
    let owners = *delivered.borrow() + returned.expect("the sender saw the channel close");
    assert_eq!(owners, 1, "delivered {} returned {:?}", delivered.borrow(), returned);
}

/// A read-ahead larger than one message travels in MORE chunks, whole.
#[test]
fn large_leftover_travels_whole() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let got: Rc<RefCell<Option<Msg>>> = Rc::default();
    let (g, bs) = (got.clone(), base.clone());
    let tx = Channel::new(&base, a, |_| {}).unwrap();
    let _rx = Channel::new(&base, b, move |ev| {
        if let ChannelEvent::Msg(m) = ev {
            *g.borrow_mut() = Some(m);
            bs.exit(Some(Duration::from_millis(20)));
        }
    })
    .unwrap();
    let body: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let (_client, server) = UnixStream::pair().unwrap();
    tx.send(Msg::conn(OwnedFd::from(server), body.clone(), 0)).unwrap();
    run(&base);
    let m = got.borrow_mut().take().expect("delivered");
    assert!(m.body == body, "body of {} bytes arrived as {} bytes", body.len(), m.body.len());
    assert_eq!(tx.in_flight(), 0, "acknowledged");
}

/// A peer that closes with our messages unread makes Linux report
/// ECONNRESET before the messages still queued to us: every one of them
/// is still delivered, and its CONN (no ACK could reach it) is an orphan.
#[test]
fn messages_behind_a_reset_are_all_read() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let seen: Rc<RefCell<Vec<u64>>> = Rc::default();
    let orphaned: Rc<RefCell<Option<usize>>> = Rc::default();
    let (s, o, bs) = (seen.clone(), orphaned.clone(), base.clone());
    let rx = Channel::new(&base, b, move |ev| match ev {
        ChannelEvent::Msg(m) => s.borrow_mut().push(m.id),
        ChannelEvent::Closed { orphans, .. } => {
            *o.borrow_mut() = Some(orphans.len());
            bs.exit(None);
        }
        ChannelEvent::Refused(_) => panic!("nothing was sent to be refused"),
    })
    .unwrap();
    // Something for the peer that it never reads: its close is a reset.
    rx.send(Msg::control(wire::KIND_USER, b"unread".to_vec())).unwrap();
    const N: u64 = 100;
    for id in 0..N {
        fdpass::send(a.as_fd(), None, &raw(wire::KIND_USER, id, &[0u8; 16])).unwrap();
    }
    let (_client, server) = UnixStream::pair().unwrap();
    fdpass::send(a.as_fd(), Some(server.as_fd()), &raw(KIND_CONN, 1, b"")).unwrap();
    drop(a);
    run(&base);
    assert_eq!(*seen.borrow(), (0..N).collect::<Vec<_>>());
    assert_eq!(*orphaned.borrow(), Some(1));
}

#[test]
fn client_addresses_travel_v4_in_the_tag_v6_after_the_body() {
    use std::net::SocketAddr;
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let got: Rc<RefCell<Vec<Msg>>> = Rc::default();
    let g = got.clone();
    let bs = base.clone();
    let tx = Channel::new(&base, a, |_| {}).unwrap();
    let _rx = Channel::new(&base, b, move |ev| {
        if let ChannelEvent::Msg(m) = ev {
            g.borrow_mut().push(m);
            if g.borrow().len() == 4 {
                bs.exit(None);
            }
        }
    })
    .unwrap();
    // A body over MAX_BODY travels in MORE chunks: the address still ends it.
    let big = vec![7u8; MAX_BODY + 100];
    let cases: Vec<(Option<SocketAddr>, Vec<u8>)> = vec![
        (Some("10.1.2.3:4567".parse().unwrap()), b"v4".to_vec()),
        (Some("[2001:db8::1]:443".parse().unwrap()), wire::join_state(b"state", b"ahead".to_vec())),
        (Some("[fe80::1%3]:80".parse().unwrap()), big.clone()),
        (None, b"none".to_vec()),
    ];
    let mut keep = Vec::new();
    for (client, body) in &cases {
        let (c, s) = UnixStream::pair().unwrap();
        keep.push(c);
        let flags = if body.len() > 10 && body.len() < 100 { wire::FLAG_STATE } else { 0 };
        tx.send(Msg::conn(OwnedFd::from(s), body.clone(), flags).with_client(*client)).unwrap();
    }
    run(&base);
    let mut got = got.borrow_mut();
    assert_eq!(got.len(), 4);
    for (m, (client, body)) in got.iter_mut().zip(&cases) {
        assert_eq!(m.take_client(), *client);
        assert_eq!(m.flags & wire::FLAG_CLIENT_V6, 0, "the flag is cleared with the address taken");
        assert_eq!(&m.body, body);
    }
    // An IPv4 client costs no body byte.
    let (_c, s) = UnixStream::pair().unwrap();
    let m = Msg::conn(OwnedFd::from(s), b"x".to_vec(), 0).with_client(cases[0].0);
    assert_eq!((m.body.len(), m.flags), (1, 0));
    assert_eq!(wire::split_state(got[1].body.clone()), (b"state".to_vec(), b"ahead".to_vec()));
}

#[test]
fn time_acks_reports_each_connection_once_acknowledged() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let times: Rc<RefCell<Vec<Duration>>> = Rc::default();
    let t = times.clone();
    let tx = Channel::new(&base, a, |_| {}).unwrap();
    tx.time_acks(move |d| t.borrow_mut().push(d));
    let _rx = Channel::new(&base, b, |_| {}).unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        let (_client, server) = UnixStream::pair().unwrap();
        tx.send(Msg::conn(OwnedFd::from(server), Vec::new(), 0)).unwrap();
    }
    // Not a CONN: not timed.
    tx.send(Msg::control(wire::KIND_USER, b"x".to_vec())).unwrap();
    assert!(times.borrow().is_empty(), "nothing is acknowledged before the loop runs");
    let bs = base.clone();
    tx.when_settled(move || bs.exit(None));
    run(&base);
    let times = times.borrow();
    assert_eq!(times.len(), 3, "one time per acknowledged connection: {times:?}");
    assert!(times.iter().all(|d| *d <= started.elapsed()), "{times:?}");
    assert_eq!(tx.stats().conns_acked, 3);
}

/// A batching sender, `n` CONNs (read-ahead of sizes 0.., one of them too
/// big for a batch, plus a control message in the middle) sent in one
/// turn: all arrive in order as the CONNs they are, in few messages, and
/// every one is acknowledged.
#[test]
fn batched_connections_arrive_whole_in_order_and_are_acknowledged() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let got: Rc<RefCell<Vec<Msg>>> = Rc::default();
    let g = got.clone();
    const N: usize = 700;
    let tx = Channel::new(&base, a, |_| {}).unwrap();
    tx.set_batch(true);
    let rx = Channel::new(&base, b, move |ev| {
        if let ChannelEvent::Msg(m) = ev {
            g.borrow_mut().push(m);
        }
    })
    .unwrap();
    let mut clients = Vec::new();
    let body = |i: usize| if i == 300 { vec![7u8; wire::BATCH_ENTRY_MAX + 1] } else { vec![i as u8; i % 50] };
    for i in 0..N {
        let (c, s) = UnixStream::pair().unwrap();
        clients.push(c);
        let m = Msg::conn(OwnedFd::from(s), body(i), (i as u32) & wire::FLAG_EOF).with_master_id(i as u64 + 1);
        assert_eq!(tx.send(m).unwrap(), i as u64 + 1);
        if i == 400 {
            tx.send(Msg::control(wire::KIND_USER, b"between".to_vec())).unwrap();
        }
    }
    // The control message wrote the CONNs queued before it (order kept).
    assert_eq!(tx.in_flight(), N);
    let bs = base.clone();
    tx.when_settled(move || bs.exit(None));
    run(&base);
    let got = got.borrow();
    assert_eq!(got.len(), N + 1);
    let conns: Vec<&Msg> = got.iter().filter(|m| m.kind == KIND_CONN).collect();
    for (i, m) in conns.iter().enumerate() {
        assert_eq!((m.id, m.tag, m.flags), (i as u64 + 1, i as u64 + 1, (i as u32) & wire::FLAG_EOF));
        assert_eq!(m.body, body(i), "read-ahead of connection {i}");
    }
    assert_eq!(got[401].kind, wire::KIND_USER, "the control message keeps its place");
    // Each descriptor is the one sent in its place.
    for (i, m) in conns.iter().enumerate().step_by(97) {
        let mut s = UnixStream::from(m.fd.as_ref().unwrap().try_clone().unwrap());
        s.write_all(&[i as u8]).unwrap();
        let mut one = [0u8; 1];
        clients[i].read_exact(&mut one).unwrap();
        assert_eq!(one[0], i as u8);
    }
    let (t, r) = (tx.stats(), rx.stats());
    assert_eq!((t.conns_sent, t.conns_acked, r.conns_received), (N as u64, N as u64, N as u64));
    // 700 CONNs in batches of <= 253 (one alone: its read-ahead is too big).
    assert!(r.msgs_received < 20, "{} messages for {N} connections", r.msgs_received);
    assert_eq!(tx.in_flight(), 0);
}

/// A batch in flight when the receiver goes: every CONN of it comes back
/// to the sender (nothing was acknowledged).
#[test]
fn an_unacknowledged_batch_comes_back_whole() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let (tx, back) = sender_keeping_returns(&base, a);
    tx.set_batch(true);
    let mut clients = Vec::new();
    for i in 0..300u64 {
        let (c, s) = UnixStream::pair().unwrap();
        clients.push(c);
        tx.send(Msg::conn(OwnedFd::from(s), i.to_le_bytes().to_vec(), 0)).unwrap();
    }
    // The batches are written at the end of this turn; the peer reads one
    // message (not acknowledged) and dies.
    let bt = base.clone();
    let flushed = Event::new(&base, -1, Interest::Timer, move || bt.exit(None)).unwrap();
    flushed.add(Some(Duration::from_millis(20))).unwrap();
    run(&base);
    assert_eq!(tx.stats().conns_sent, 300, "written in batches");
    let mut buf = vec![0u8; HEADER_LEN + MAX_BODY];
    let r = fdpass::recv_many(b.as_fd(), &mut buf).unwrap();
    assert_eq!(r.fds.len(), wire::MAX_BATCH);
    drop(r);
    drop(b);
    run(&base);
    let back = back.borrow_mut().take().expect("Closed delivered");
    let mut ids: Vec<u64> = back.iter().map(|m| u64::from_le_bytes(m.body[..8].try_into().unwrap())).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..300).collect::<Vec<_>>());
    assert!(back.iter().all(|m| m.fd.is_some()), "each comes back with its descriptor");
}

/// More messages wait than one receive call reads (CONNs with their
/// descriptors, controls between them): every one arrives, in order, each
/// CONN with a working descriptor and acknowledged.
#[test]
fn many_waiting_messages_with_descriptors_arrive_in_order_and_complete() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let got: Rc<RefCell<Vec<Msg>>> = Rc::default();
    const N: usize = 3 * RX_SLOTS + 1;
    let (g, bs) = (got.clone(), base.clone());
    let tx = Channel::new(&base, a, |_| {}).unwrap();
    // Everything is written before the receiver exists, so it all waits.
    let mut clients = Vec::new();
    for n in 0..N {
        if n % 3 == 1 {
            tx.send(Msg::control(wire::KIND_USER, vec![n as u8])).unwrap();
        } else {
            let (client, server) = UnixStream::pair().unwrap();
            clients.push((n, client));
            tx.send(Msg::conn(OwnedFd::from(server), vec![n as u8], 0)).unwrap();
        }
    }
    let _rx = Channel::new(&base, b, move |ev| {
        if let ChannelEvent::Msg(m) = ev {
            g.borrow_mut().push(m);
            if g.borrow().len() == N {
                bs.exit(Some(Duration::from_millis(20)));
            }
        }
    })
    .unwrap();
    run(&base);
    let got = std::mem::take(&mut *got.borrow_mut());
    let order: Vec<u8> = got.iter().map(|m| m.body[0]).collect();
    assert_eq!(order, (0..N as u8).collect::<Vec<_>>());
    let mut got: std::collections::HashMap<u8, Msg> = got.into_iter().map(|m| (m.body[0], m)).collect();
    for (n, mut client) in clients {
        let m = got.remove(&(n as u8)).unwrap();
        assert_eq!(m.kind, KIND_CONN);
        let mut moved = UnixStream::from(m.fd.expect("a CONN carries its descriptor"));
        moved.write_all(&[n as u8]).unwrap();
        let mut buf = [0u8; 1];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(buf[0], n as u8, "CONN {n} carried its own connection");
    }
    assert_eq!(tx.stats().conns_acked, (N - N / 3) as u64, "every CONN acknowledged");
    assert_eq!(tx.in_flight(), 0);
}

/// A message carrying more descriptors than its kind allows, behind good
/// ones in the same receive: those before it are delivered, then the
/// channel closes with the reason, and nothing after it is delivered.
#[test]
fn too_many_descriptors_behind_good_messages_closes_after_them() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let seen: Rc<RefCell<Vec<u64>>> = Rc::default();
    let reason: Rc<RefCell<Option<String>>> = Rc::default();
    let (s, r, bs) = (seen.clone(), reason.clone(), base.clone());
    for id in 1..=3 {
        let (_c, server) = UnixStream::pair().unwrap();
        fdpass::send(a.as_fd(), Some(server.as_fd()), &raw(KIND_CONN, id, b"")).unwrap();
    }
    let (_c1, s1) = UnixStream::pair().unwrap();
    let (_c2, s2) = UnixStream::pair().unwrap();
    fdpass::send_many(a.as_fd(), &[s1.as_fd(), s2.as_fd()], &raw(KIND_CONN, 4, b"")).unwrap();
    fdpass::send(a.as_fd(), None, &raw(wire::KIND_USER, 5, b"after")).unwrap();
    let _rx = Channel::new(&base, b, move |ev| match ev {
        ChannelEvent::Msg(m) => s.borrow_mut().push(m.id),
        ChannelEvent::Closed { reason, .. } => {
            *r.borrow_mut() = reason.map(|e| e.to_string());
            bs.exit(None);
        }
        ChannelEvent::Refused(_) => panic!("nothing was sent to be refused"),
    })
    .unwrap();
    run(&base);
    assert_eq!(*seen.borrow(), vec![1, 2, 3]);
    assert_eq!(reason.borrow().as_deref(), Some("unexpected descriptor"));
}

/// Lazy ACKs: a sent CONN is kept until its ACK is read, the ACKs are
/// read without the owner doing anything (by LAZY_POLL), the socket is
/// watched again once all are in, and the owner still hears the peer's
/// messages.
#[test]
fn lazy_acks_keep_each_copy_until_read_then_settle() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let notes: Rc<RefCell<Vec<Vec<u8>>>> = Rc::default();
    let (nn, bs) = (notes.clone(), base.clone());
    let tx = Channel::new(&base, a, move |ev| {
        if let ChannelEvent::Msg(m) = ev {
            nn.borrow_mut().push(m.body);
            bs.exit(None);
        }
    })
    .unwrap();
    tx.set_lazy_acks(true);
    let rx_got: Rc<RefCell<Vec<Msg>>> = Rc::default();
    let g = rx_got.clone();
    let rx = Channel::new(&base, b, move |ev| {
        if let ChannelEvent::Msg(m) = ev {
            g.borrow_mut().push(m);
        }
    })
    .unwrap();
    const N: usize = 10;
    for n in 0..N {
        let (_client, server) = UnixStream::pair().unwrap();
        tx.send(Msg::conn(OwnedFd::from(server), vec![n as u8], 0)).unwrap();
    }
    assert_eq!(tx.in_flight(), N, "every copy held until its ACK is read");
    let (settled, bs) = (Rc::new(RefCell::new(false)), base.clone());
    let st = settled.clone();
    tx.when_settled(move || {
        *st.borrow_mut() = true;
        bs.exit(None);
    });
    run(&base);
    assert!(*settled.borrow(), "settled once the ACKs were read");
    assert_eq!((tx.in_flight(), tx.stats().conns_acked, rx_got.borrow().len()), (0, N as u64, N));
    // Idle again: the socket is watched, the peer's messages arrive.
    rx.send(Msg::control(wire::KIND_USER, b"note".to_vec())).unwrap();
    run(&base);
    assert_eq!(*notes.borrow(), vec![b"note".to_vec()]);
}

/// Lazy ACKs: a peer that dies while CONNs wait for their ACK is noticed
/// without another send; what it acknowledged is gone, the rest returned.
#[test]
fn lazy_acks_notice_a_dead_peer_and_return_the_unacknowledged() {
    let base = Base::new().unwrap();
    let (a, b) = sock::seqpacket_pair().unwrap();
    let (tx, back) = sender_keeping_returns(&base, a);
    tx.set_lazy_acks(true);
    for n in 0..3u8 {
        let (_client, server) = UnixStream::pair().unwrap();
        tx.send(Msg::conn(OwnedFd::from(server), vec![n], 0)).unwrap();
    }
    // The peer takes the first (its ACK written), then dies.
    let mut buf = vec![0u8; HEADER_LEN + 16];
    let r = fdpass::recv_many(b.as_fd(), &mut buf).unwrap();
    let h = Header::decode(&buf[..r.len]).unwrap();
    fdpass::send(b.as_fd(), None, &raw(KIND_ACK, h.id, b"")).unwrap();
    drop(b);
    run(&base);
    let bodies: Option<Vec<u8>> = back.borrow().as_ref().map(|r| r.iter().map(|m| m.body[0]).collect());
    assert_eq!(bodies.as_deref(), Some(&[1u8, 2][..]), "the two never acknowledged come back");
    assert_eq!(tx.stats().conns_acked, 1);
}

/// A pipe passed as a connection: an ordinary channel refuses it and
/// closes; one that trusts its peer (a worker's link to its own master)
/// does not spend a `getsockopt` on it and delivers it.
#[test]
fn only_a_trusting_channel_skips_the_stream_socket_check() {
    for trusting in [false, true] {
        let base = Base::new().unwrap();
        let (a, b) = sock::seqpacket_pair().unwrap();
        let seen: Rc<RefCell<Vec<&'static str>>> = Rc::default();
        let s = seen.clone();
        let bs = base.clone();
        let tx = Channel::new(&base, a, |_| {}).unwrap();
        let rx = Channel::new(&base, b, move |ev| {
            s.borrow_mut().push(match ev {
                ChannelEvent::Msg(m) if m.fd.is_some() => "conn",
                ChannelEvent::Closed { .. } => "closed",
                _ => "other",
            });
            bs.exit(Some(Duration::from_millis(20)));
        })
        .unwrap();
        if trusting {
            rx.trust_descriptors();
        }
        let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
        tx.send(Msg::conn(OwnedFd::from(pipe_r), Vec::new(), 0)).unwrap();
        run(&base);
        let want = if trusting { "conn" } else { "closed" };
        assert_eq!(seen.borrow().first().copied(), Some(want), "trusting={trusting}: {:?}", seen.borrow());
    }
}
