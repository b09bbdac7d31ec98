//! Segment header: the first 64 bytes of every `.log` file (FORMAT.md 2.1).
//! It names the segment's first offset, its key and its salt.

use super::{read_i64, read_u16, read_u32, read_u64, write_i64, write_u16, write_u32, write_u64};
use crate::error::{Error, Result};
use std::path::Path;

pub const SEGMENT_MAGIC: &[u8; 8] = b"NATSWALS";
pub const SEGMENT_HEADER_LENGTH: usize = 64;
const CRC_POSITION: usize = 60;

/// Decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub base_offset: u64,
    pub created_at_ns: i64,
    pub key_id: u32,
    pub compression: u8,
    /// Cipher of the segment's encrypted frames: 0 none, 1 AES-256-GCM,
    /// 2 ChaCha20-Poly1305.
    pub cipher: u8,
    /// Random per incarnation of the file; seeds the slot checksums, so
    /// bytes left from an earlier use of a recycled file, or a frame a
    /// publisher put in a payload, never verify as a slot of this segment.
    pub salt: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LENGTH] {
        let mut bytes = [0u8; SEGMENT_HEADER_LENGTH];
        bytes[0..8].copy_from_slice(SEGMENT_MAGIC);
        write_u16(&mut bytes, 8, super::FORMAT_VERSION);
        write_u16(&mut bytes, 10, SEGMENT_HEADER_LENGTH as u16);
        write_u32(&mut bytes, 12, 0);
        write_u64(&mut bytes, 16, self.base_offset);
        write_i64(&mut bytes, 24, self.created_at_ns);
        write_u32(&mut bytes, 32, self.key_id);
        bytes[36] = self.compression;
        bytes[37] = self.cipher;
        write_u64(&mut bytes, 40, self.salt);
        let crc = crc32c::crc32c(&bytes[..CRC_POSITION]);
        write_u32(&mut bytes, CRC_POSITION, crc);
        bytes
    }

    /// Decodes and validates a header; `path` is only used in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<SegmentHeader> {
        if bytes.len() < SEGMENT_HEADER_LENGTH {
            return Err(Error::corruption(
                path,
                0,
                format!(
                    "file is {} bytes, shorter than the {SEGMENT_HEADER_LENGTH}-byte segment header",
                    bytes.len()
                ),
            ));
        }
        if &bytes[0..8] != SEGMENT_MAGIC {
            return Err(Error::corruption(
                path,
                0,
                "not a natswal segment (bad magic)",
            ));
        }
        let stored_crc = read_u32(bytes, CRC_POSITION);
        if crc32c::crc32c(&bytes[..CRC_POSITION]) != stored_crc {
            return Err(Error::corruption(
                path,
                0,
                "segment header checksum mismatch",
            ));
        }
        let version = read_u16(bytes, 8);
        if version != super::FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: super::FORMAT_VERSION,
            });
        }
        let header_length = read_u16(bytes, 10) as usize;
        let flags = read_u32(bytes, 12);
        let reserved_clear = bytes[38..40].iter().all(|byte| *byte == 0)
            && bytes[48..60].iter().all(|byte| *byte == 0);
        if header_length != SEGMENT_HEADER_LENGTH || flags != 0 || !reserved_clear {
            return Err(Error::corruption(
                path,
                0,
                format!("segment header length {header_length} / flags {flags:#x} / reserved bytes not understood by format version {}", super::FORMAT_VERSION),
            ));
        }
        Ok(SegmentHeader {
            base_offset: read_u64(bytes, 16),
            created_at_ns: read_i64(bytes, 24),
            key_id: read_u32(bytes, 32),
            compression: bytes[36],
            cipher: bytes[37],
            salt: read_u64(bytes, 40),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_single_bit_flip_is_rejected() {
        let header = SegmentHeader {
            base_offset: 77,
            created_at_ns: 1_700_000_000_000_000_000,
            key_id: 3,
            compression: 1,
            cipher: 2,
            salt: 0xfeed_beef_1234_5678,
        };
        let bytes = header.encode();
        let path = Path::new("x.log");
        assert_eq!(SegmentHeader::decode(&bytes, path).unwrap(), header);
        for bit in 0..SEGMENT_HEADER_LENGTH * 8 {
            let mut damaged = bytes;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(SegmentHeader::decode(&damaged, path).is_err(), "bit {bit}");
        }
        assert!(SegmentHeader::decode(&bytes[..10], path).is_err());
    }

    #[test]
    fn newer_version_is_named_in_the_error() {
        let mut bytes = SegmentHeader {
            base_offset: 0,
            created_at_ns: 0,
            key_id: 0,
            compression: 0,
            cipher: 0,
            salt: 1,
        }
        .encode();
        write_u16(&mut bytes, 8, 9);
        let crc = crc32c::crc32c(&bytes[..CRC_POSITION]);
        write_u32(&mut bytes, CRC_POSITION, crc);
        let error = SegmentHeader::decode(&bytes, Path::new("s.log")).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("version 9"), "{message}");
        assert!(message.contains("upgrade natswal"), "{message}");
    }
}
