//! handoff: move live TCP connections between processes by passing their
//! descriptors over Unix-domain sockets (SCM_RIGHTS).
//!
//! Layers, bottom up: `sys` (bindgen output for `csrc/`), `sock` (raw
//! socket syscalls), `fdpass` (safe descriptor passing), `reactor`
//! (libevent), `channel` (the handoff channel), `proto` (framings), then
//! one module per mode.
pub mod channel;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod fdpass;
pub mod logging;
pub mod node;
pub mod pair;
pub mod proto;
pub mod reactor;
pub mod reqlog;
pub mod service;
pub mod signals;
pub mod sock;
pub mod sys;
