//! Framings spoken on client connections.
pub mod pingpong;
