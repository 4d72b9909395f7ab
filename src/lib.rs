//! handoff: move live TCP connections between processes by passing their
//! descriptors over Unix-domain sockets (SCM_RIGHTS).
//!
//! Layers, bottom up: `sys` (bindgen output for `csrc/`), `sock` (raw
//! socket syscalls), `fdpass` (safe descriptor passing), `reactor`
//! (libevent), `channel` (the handoff channel), `proto` (framings), then
//! one module per mode.
pub mod channel;
pub mod fdpass;
pub mod reactor;
pub mod sock;
pub mod sys;
