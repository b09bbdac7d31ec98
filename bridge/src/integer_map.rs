//! Hash maps keyed by integers that natswal hands out itself (subscription
//! ids, append group tokens): std's SipHash guards against keys chosen by
//! an attacker, which these are not, and costs a few percent of ingest's
//! CPU on lookups made once per message.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from natswal-assigned integers.
pub type IntegerMap<V> = HashMap<u64, V, BuildHasherDefault<IntegerHasher>>;

/// Fibonacci hashing of one `u64` (the high bits, which hashbrown uses,
/// depend on every bit of the key).
#[derive(Default)]
pub struct IntegerHasher(u64);

impl Hasher for IntegerHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is expected; anything else still hashes.
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::IntegerMap;

    #[test]
    fn sequential_keys_are_found() {
        let mut map = IntegerMap::default();
        for key in 0..10_000u64 {
            map.insert(key, key * 2);
        }
        assert!((0..10_000u64).all(|key| map.get(&key) == Some(&(key * 2))));
        assert_eq!(map.get(&10_000), None);
    }
}
