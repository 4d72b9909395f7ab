//! Node mode, manager side: one port serves clients and other nodes'
//! workers, told apart by the first frame. A node link starts with the
//! node protocol's magic and a CONNECT_REQ naming a worker; the manager
//! answers and hands the socket (with any bytes read past the request) to
//! that worker. Anything else is a client: it goes round-robin with the
//! bytes read so far, exactly as in cluster mode.
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;

use serde_json::json;

use crate::core::channel::{wire, Msg};
use crate::core::reactor::{Conn, ConnEvent};
use crate::core::sock;
use crate::topology::cluster::master::{with, Master};
use crate::topology::node::handover::LinkState;
use crate::topology::node::wire::{self as node, Cmd, Parsed};

/// Bytes a manager reads before deciding: a link's first message
/// (CONNECT_REQ, header included) must fit, far below the 1 MiB of other
/// node messages; a larger one closes the link at once.
pub const SNIFF_LIMIT: usize = 64 * 1024;

pub(crate) struct Sniffed {
    conn: Conn,
    /// After the reply is flushed: hand to this worker (or close if None).
    then: Option<Option<usize>>,
}

impl Master {
    pub(crate) fn sniff(&mut self, fd: OwnedFd) {
        let _ = sock::set_nodelay(fd.as_raw_fd());
        if self.draining {
            // A restart runs: the next generation tells it apart.
            self.forward(Msg::conn(fd, Vec::new(), wire::FLAG_SNIFF));
            return;
        }
        self.sniff_from(fd, &[]);
    }

    /// Watches a connection until its first frame tells what it is;
    /// `read` is what an earlier owner read of it.
    pub(crate) fn sniff_from(&mut self, fd: OwnedFd, read: &[u8]) {
        let id = self.next_client;
        self.next_client += 1;
        let w = self.me.clone();
        match Conn::adopt(&self.base, fd, read, SNIFF_LIMIT, Rc::new(move |ev| with(&w, |m| m.on_sniff(id, ev)))) {
            Ok(conn) => {
                conn.resume_reading();
                self.sniffing.insert(id, Sniffed { conn, then: None });
                if !read.is_empty() {
                    self.examine(id);
                }
            }
            Err(e) => log::error!("cannot watch a new connection: {e}"),
        }
    }

    /// A restart's move begins: connections not yet told apart go to the
    /// next generation with what was read of them (flagged to be sniffed
    /// again there); those whose CONNECT_RESP is on its way follow as links
    /// once it is out.
    pub(crate) fn forward_undecided(&mut self) {
        let ids: Vec<u64> = self.sniffing.iter().filter(|(_, s)| s.then.is_none()).map(|(&id, _)| id).collect();
        for id in ids {
            let Some(s) = self.sniffing.remove(&id) else { continue };
            let (fd, read) = s.conn.detach();
            self.forward(Msg::conn(fd, read, wire::FLAG_SNIFF));
        }
    }

    fn on_sniff(&mut self, id: u64, ev: ConnEvent) {
        match ev {
            ConnEvent::Read => self.examine(id),
            ConnEvent::Drained => {
                if let Some(Some(target)) = self.sniffing.get(&id).and_then(|s| s.then) {
                    self.hand_link(id, target);
                } else if self.sniffing.get(&id).is_some_and(|s| s.then.is_some()) {
                    self.sniffing.remove(&id);
                }
            }
            ConnEvent::Eof => {
                // A client may send its request and half-close at once.
                self.examine(id);
                let Some(s) = self.sniffing.get(&id) else { return };
                if s.then.is_some() {
                    return; // a link whose CONNECT_RESP is still flushing
                }
                if node::is_node(s.conn.peek(s.conn.input_len().min(4))) {
                    log::info!("node link closed before its CONNECT_REQ was complete");
                    self.sniffing.remove(&id);
                } else {
                    // Undecided at EOF: a client (the worker answers what is
                    // complete, then closes).
                    self.hand_client(id, wire::FLAG_EOF);
                }
            }
            ConnEvent::Error(_) | ConnEvent::Timeout => {
                self.sniffing.remove(&id);
            }
        }
    }

    fn examine(&mut self, id: u64) {
        let Some(s) = self.sniffing.get(&id) else { return };
        if s.then.is_some() {
            return;
        }
        let avail = s.conn.input_len();
        if avail < 4 {
            return;
        }
        if !node::is_node(s.conn.peek(4)) {
            self.hand_client(id, 0);
            return;
        }
        let head = s.conn.peek(avail.min(16));
        if head.len() == 16 {
            let body_len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
            if body_len + 16 > SNIFF_LIMIT {
                log::info!(
                    "node link: first message of {body_len} bytes exceeds the {SNIFF_LIMIT}-byte limit; closing"
                );
                self.sniffing.remove(&id);
                return;
            }
        }
        let parsed = node::parse(s.conn.peek(avail));
        match parsed {
            Parsed::Incomplete => {}
            Parsed::Message { cmd: Cmd::ConnectReq, body, len, .. } => {
                let body: serde_json::Value = match node::body(Cmd::ConnectReq, body) {
                    Ok(v) => v,
                    Err(why) => {
                        log::info!("bad node link: {why}; closing");
                        self.sniffing.remove(&id);
                        return;
                    }
                };
                self.sniffing.get_mut(&id).expect("present").conn.consume(len);
                let to = body["to"].as_u64().map(|t| t as usize).filter(|&t| t < self.slots.len());
                let reply = match to {
                    Some(_) => json!({"ok": true}),
                    None => {
                        json!({"ok": false, "reason": format!("no worker {} on node {}", body["to"], self.node_name())})
                    }
                };
                log::debug!("node link from {}:{} to worker {}", body["node"], body["worker"], body["to"]);
                let s = self.sniffing.get_mut(&id).expect("present");
                let flushed = s.conn.write_now(&node::encode(Cmd::ConnectResp, 0, &reply));
                match (flushed, to) {
                    (Ok(true), Some(t)) => self.hand_link(id, t),
                    (Ok(false), t) => {
                        s.then = Some(t);
                        s.conn.pause_reading();
                    }
                    (Ok(true), None) | (Err(_), _) => {
                        self.sniffing.remove(&id);
                    }
                }
            }
            Parsed::Message { cmd, .. } => {
                log::info!("node link opened with {cmd:?} instead of CONNECT_REQ; closing");
                self.sniffing.remove(&id);
            }
            Parsed::Bad(why) => {
                log::info!("bad node link: {why}; closing");
                self.sniffing.remove(&id);
            }
        }
    }

    fn hand_client(&mut self, id: u64, flags: u32) {
        let Some(s) = self.sniffing.remove(&id) else { return };
        let (fd, leftover) = s.conn.detach();
        if let Some(i) = self.assign_to(None, Msg::conn(fd, leftover, flags)) {
            self.metrics.accepted_by(i);
        }
    }

    fn hand_link(&mut self, id: u64, target: usize) {
        let Some(s) = self.sniffing.remove(&id) else { return };
        let (fd, leftover) = s.conn.detach();
        let msg = LinkState { worker: target, out: None, pings: false }.conn(fd, leftover);
        if let Some(i) = self.assign_to(Some(target), msg) {
            self.metrics.accepted_by(i);
        }
    }

    pub(crate) fn node_name(&self) -> &str {
        self.cfg.node.as_ref().map_or("", |n| n.name.as_str())
    }
}
