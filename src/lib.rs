//! handoff: move live TCP connections between processes by passing their
#![warn(missing_docs)]
//! descriptors over Unix-domain sockets (SCM_RIGHTS), and serve any
//! protocol on the topologies built from that: pair, cluster, node and
//! hot restart.
//!
//! Start at [`service`] (write a protocol) and [`cli`] (give it the whole
//! command line). The layers, bottom up:
//! - [`core`]: descriptor passing, the libevent reactor, the handoff
//!   channel;
//! - [`topology`]: pair, cluster (master and workers), node, restart;
//! - [`service`]: the protocols (pingpong, rpc; `examples/http.rs`).
pub mod cli;
pub mod client;
pub mod core;
pub mod service;
pub mod topology;
