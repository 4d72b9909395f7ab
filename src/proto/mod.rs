//! Framings spoken on client connections.
pub mod pingpong;
pub mod rpc;
