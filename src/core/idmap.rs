//! Maps keyed by connection ids.
//!
//! A connection id is a number a master hands out in sequence, never one
//! a client picks, so its map needs no flood-resistant hash: one multiply
//! (the Fibonacci constant, as FxHash does) spreads sequential ids over
//! the table, where std's SipHash costs a few dozen nanoseconds on every
//! request a worker serves and every connection a master accepts.
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// 2^64 / φ, odd: a multiply by it is a bijection that mixes the high bits.
const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// The [`Hasher`] of an [`IdMap`]: for `u64` keys, one multiply.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(K);
    }
}

/// A map from connection ids (handed out by a master, in sequence) to `V`.
///
/// ```
/// use handoff::core::idmap::IdMap;
///
/// let mut m: IdMap<&str> = IdMap::default();
/// for id in 1..=1000u64 {
///     m.insert(id, "conn");
/// }
/// assert_eq!(m.len(), 1000);
/// assert_eq!(m.get(&500), Some(&"conn"));
/// ```
pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn sequential_ids_spread_over_the_top_and_bottom_bits() {
        let b = BuildHasherDefault::<IdHasher>::default();
        let hashes: Vec<u64> = (1..=4096u64).map(|id| b.hash_one(id)).collect();
        // The table index (low bits) of 4096 sequential ids is a bijection.
        let mut low: Vec<u64> = hashes.iter().map(|h| h & 4095).collect();
        low.sort_unstable();
        low.dedup();
        assert_eq!(low.len(), 4096);
        // The control byte (top 7 bits) takes every value.
        let mut top: Vec<u64> = hashes.iter().map(|h| h >> 57).collect();
        top.sort_unstable();
        top.dedup();
        assert_eq!(top.len(), 128);
    }
}
