//! The core every topology stands on: descriptor passing ([`fdpass`]),
//! one libevent loop per process ([`reactor`]), and the handoff channel
//! that moves connections with their read-ahead and one owner at a time
//! ([`channel`]). [`user`] starts child processes as another user.
pub mod channel;
pub mod fdpass;
pub mod idmap;
pub mod limits;
pub mod logging;
pub mod notify;
pub mod reactor;
pub(crate) mod signals;
#[doc(hidden)] // socket syscalls; public for the integration tests only
pub mod sock;
mod sys;
pub mod user;
