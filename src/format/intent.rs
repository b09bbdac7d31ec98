//! The truncation intent file `truncate.intent` (FORMAT.md 4.2): a
//! truncation is several file operations (remove later segments, cut one,
//! maybe append the records kept from a frame that straddled the cut). The
//! intent is written atomically before the first of them and removed after
//! the last; an open that finds it redoes the truncation, so a crash at any
//! step leaves the old log (no intent yet) or the new one.

use super::{read_u16, read_u32, read_u64, write_u16, write_u32, write_u64};

pub const INTENT_MAGIC: &[u8; 8] = b"NATSWALT";
pub const INTENT_FILE_NAME: &str = "truncate.intent";
const HEADER_LENGTH: usize = 56;

/// What a truncation does, in terms of files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncationIntent {
    /// Records from this offset on are removed.
    pub from_offset: u64,
    /// The segment that is cut; every later segment is removed.
    pub segment_base: u64,
    /// Slot position at which that segment is cut.
    pub position: u64,
    /// A frame appended at the cut: the records of the frame that
    /// straddled it which are kept (empty for a cut at a frame boundary).
    pub replacement: Vec<u8>,
    /// The salt of the cut segment, so that the replacement's slot can be
    /// written even when the segment header was damaged after the plan.
    pub salt: u64,
}

impl TruncationIntent {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_LENGTH];
        bytes[0..8].copy_from_slice(INTENT_MAGIC);
        write_u16(&mut bytes, 8, super::FORMAT_VERSION);
        write_u16(&mut bytes, 10, HEADER_LENGTH as u16);
        write_u64(&mut bytes, 16, self.from_offset);
        write_u64(&mut bytes, 24, self.segment_base);
        write_u64(&mut bytes, 32, self.position);
        write_u32(&mut bytes, 40, self.replacement.len() as u32);
        write_u64(&mut bytes, 48, self.salt);
        bytes.extend_from_slice(&self.replacement);
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<TruncationIntent, String> {
        if bytes.len() < HEADER_LENGTH + 4 || &bytes[0..8] != INTENT_MAGIC {
            return Err("not a truncation intent".to_string());
        }
        let body_end = bytes.len() - 4;
        if crc32c::crc32c(&bytes[..body_end]) != read_u32(bytes, body_end) {
            return Err("truncation intent checksum mismatch".to_string());
        }
        let version = read_u16(bytes, 8);
        if version != super::FORMAT_VERSION || read_u16(bytes, 10) as usize != HEADER_LENGTH {
            return Err(format!(
                "truncation intent version {version} not understood"
            ));
        }
        let replacement_length = read_u32(bytes, 40) as usize;
        if HEADER_LENGTH + replacement_length != body_end {
            return Err("truncation intent length does not match its replacement".to_string());
        }
        Ok(TruncationIntent {
            from_offset: read_u64(bytes, 16),
            segment_base: read_u64(bytes, 24),
            position: read_u64(bytes, 32),
            replacement: bytes[HEADER_LENGTH..body_end].to_vec(),
            salt: read_u64(bytes, 48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_round_trips_and_damage_is_detected() {
        let intent = TruncationIntent {
            from_offset: 55,
            segment_base: 40,
            position: 4096,
            replacement: vec![1, 2, 3, 4, 5],
            salt: 0x1234_5678_9abc_def0,
        };
        let bytes = intent.encode();
        assert_eq!(TruncationIntent::decode(&bytes), Ok(intent));
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(TruncationIntent::decode(&damaged).is_err(), "bit {bit}");
        }
    }
}
