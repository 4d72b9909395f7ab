//! Framings of the topologies' own links.
pub mod node;
