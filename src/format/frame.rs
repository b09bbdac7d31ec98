//! Batch frame (FORMAT.md 2.2): the unit of writing, checksumming,
//! compressing and encrypting. A frame is valid only as a whole.

use super::record::{Record, RecordIter};
use super::{read_i64, read_u16, read_u32, read_u64, write_i64, write_u16, write_u32, write_u64};
use bytes::Bytes;

pub const FRAME_MAGIC: &[u8; 4] = b"NWF1";
pub const FRAME_HEADER_LENGTH: usize = 96;
/// Bytes of the header before the checksummed range.
const CRC_START: usize = 8;

/// Flag bits of a frame header.
pub mod flags {
    /// Bits 0-1: compression codec of the body.
    pub const COMPRESSION_MASK: u16 = 0b11;
    pub const COMPRESSION_NONE: u16 = 0;
    pub const COMPRESSION_ZSTD: u16 = 1;
    /// The body is AEAD-encrypted.
    pub const ENCRYPTED: u16 = 1 << 2;
    /// The frame is one client batch and is never split.
    pub const ATOMIC: u16 = 1 << 3;
    /// Every flag bit version 1 defines.
    pub const KNOWN: u16 = COMPRESSION_MASK | ENCRYPTED | ATOMIC;
}

/// Decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameHeader {
    pub frame_length: u32,
    pub flags: u16,
    pub base_offset: u64,
    pub record_count: u32,
    pub body_length_plain: u32,
    pub first_timestamp_ns: i64,
    pub last_timestamp_ns: i64,
    pub raft_term: u64,
    pub raft_index: u64,
    pub durable_position: u64,
    pub nonce: [u8; 12],
}

impl FrameHeader {
    /// Offset one past the frame's last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }

    pub fn is_atomic(&self) -> bool {
        self.flags & flags::ATOMIC != 0
    }

    /// Writes the header fields (not the checksum) into `out[..96]`.
    pub(crate) fn encode_fields(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(FRAME_MAGIC);
        write_u32(out, 8, self.frame_length);
        write_u16(out, 12, FRAME_HEADER_LENGTH as u16);
        write_u16(out, 14, self.flags);
        write_u64(out, 16, self.base_offset);
        write_u32(out, 24, self.record_count);
        write_u32(out, 28, self.body_length_plain);
        write_i64(out, 32, self.first_timestamp_ns);
        write_i64(out, 40, self.last_timestamp_ns);
        write_u64(out, 48, self.raft_term);
        write_u64(out, 56, self.raft_index);
        write_u64(out, 64, self.durable_position);
        out[72..84].copy_from_slice(&self.nonce);
        out[84..96].fill(0);
    }

    fn decode_fields(bytes: &[u8]) -> FrameHeader {
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&bytes[72..84]);
        FrameHeader {
            frame_length: read_u32(bytes, 8),
            flags: read_u16(bytes, 14),
            base_offset: read_u64(bytes, 16),
            record_count: read_u32(bytes, 24),
            body_length_plain: read_u32(bytes, 28),
            first_timestamp_ns: read_i64(bytes, 32),
            last_timestamp_ns: read_i64(bytes, 40),
            raft_term: read_u64(bytes, 48),
            raft_index: read_u64(bytes, 56),
            durable_position: read_u64(bytes, 64),
            nonce,
        }
    }

    /// Records of a frame with a plain body (not compressed, not encrypted).
    pub fn plain_records(&self, frame: &Bytes) -> RecordIter {
        let body = frame.slice(FRAME_HEADER_LENGTH..self.frame_length as usize);
        RecordIter::new(body, self.base_offset, self.record_count)
    }
}

/// Why bytes at a position are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameDefect {
    /// Magic and length are zero: nothing was written here.
    Empty,
    /// The frame claims more bytes than are available.
    Incomplete {
        frame_length: u64,
        available: u64,
    },
    BadMagic,
    BadLength(u32),
    BadChecksum,
}

impl std::fmt::Display for FrameDefect {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameDefect::Empty => write!(formatter, "no frame (zero bytes)"),
            FrameDefect::Incomplete {
                frame_length,
                available,
            } => write!(
                formatter,
                "frame of {frame_length} bytes but only {available} bytes follow"
            ),
            FrameDefect::BadMagic => write!(formatter, "bad frame magic"),
            FrameDefect::BadLength(length) => write!(formatter, "impossible frame length {length}"),
            FrameDefect::BadChecksum => write!(formatter, "frame checksum mismatch"),
        }
    }
}

/// Result of checking the bytes at a frame position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameCheck {
    Valid(FrameHeader),
    /// Not a frame: torn, empty or damaged.
    Defect(FrameDefect),
    /// The checksum matches but the header uses something version 1 does not
    /// define: a format error, never treated as a torn write.
    Unsupported(String),
}

/// Checks the frame that starts at `bytes[0]`; `bytes` ends where the
/// readable data ends. Never reads outside `bytes`.
pub fn check_frame(bytes: &[u8]) -> FrameCheck {
    if bytes.len() < 12 {
        if bytes.iter().all(|byte| *byte == 0) {
            return FrameCheck::Defect(FrameDefect::Empty);
        }
        return FrameCheck::Defect(FrameDefect::Incomplete {
            frame_length: FRAME_HEADER_LENGTH as u64,
            available: bytes.len() as u64,
        });
    }
    let frame_length = read_u32(bytes, 8);
    if &bytes[0..4] != FRAME_MAGIC {
        if read_u32(bytes, 0) == 0 && frame_length == 0 {
            return FrameCheck::Defect(FrameDefect::Empty);
        }
        return FrameCheck::Defect(FrameDefect::BadMagic);
    }
    if (frame_length as usize) < FRAME_HEADER_LENGTH {
        return FrameCheck::Defect(FrameDefect::BadLength(frame_length));
    }
    if frame_length as usize > bytes.len() {
        return FrameCheck::Defect(FrameDefect::Incomplete {
            frame_length: u64::from(frame_length),
            available: bytes.len() as u64,
        });
    }
    let frame = &bytes[..frame_length as usize];
    if crc32c::crc32c(&frame[CRC_START..]) != read_u32(frame, 4) {
        return FrameCheck::Defect(FrameDefect::BadChecksum);
    }
    let header = FrameHeader::decode_fields(frame);
    let header_length = read_u16(frame, 12) as usize;
    if header_length != FRAME_HEADER_LENGTH {
        return FrameCheck::Unsupported(format!(
            "frame header length {header_length}, version 1 defines {FRAME_HEADER_LENGTH}"
        ));
    }
    if header.flags & !flags::KNOWN != 0 {
        return FrameCheck::Unsupported(format!("unknown frame flags {:#06x}", header.flags));
    }
    if header.flags & flags::COMPRESSION_MASK > flags::COMPRESSION_ZSTD {
        return FrameCheck::Unsupported(format!(
            "unknown compression codec {}",
            header.flags & flags::COMPRESSION_MASK
        ));
    }
    if header.record_count == 0 {
        return FrameCheck::Unsupported("frame with zero records".to_string());
    }
    if header
        .base_offset
        .checked_add(u64::from(header.record_count))
        .is_none()
    {
        return FrameCheck::Unsupported("frame offsets overflow".to_string());
    }
    let plain_body = header.flags & (flags::COMPRESSION_MASK | flags::ENCRYPTED) == 0;
    if plain_body && header.body_length_plain as usize != frame.len() - FRAME_HEADER_LENGTH {
        return FrameCheck::Unsupported(format!(
            "plain body of {} bytes but header says {}",
            frame.len() - FRAME_HEADER_LENGTH,
            header.body_length_plain
        ));
    }
    FrameCheck::Valid(header)
}

/// Builds one frame in a reusable buffer: header placeholder, then records,
/// then [`FrameBuilder::finish`] fills the header and checksum in place.
#[derive(Debug, Default)]
pub struct FrameBuilder {
    pub(crate) buffer: Vec<u8>,
    pub(crate) header: FrameHeader,
}

impl FrameBuilder {
    pub fn new() -> FrameBuilder {
        FrameBuilder::default()
    }

    /// Starts a new frame, discarding any unfinished one.
    pub fn begin(&mut self, base_offset: u64, raft_term: u64, raft_index: u64) {
        self.buffer.clear();
        self.buffer.resize(FRAME_HEADER_LENGTH, 0);
        self.header = FrameHeader {
            base_offset,
            raft_term,
            raft_index,
            first_timestamp_ns: 0,
            last_timestamp_ns: i64::MIN,
            ..FrameHeader::default()
        };
    }

    pub fn push(&mut self, record: &Record, timestamp_ns: i64) {
        if self.header.record_count == 0 {
            self.header.first_timestamp_ns = timestamp_ns;
        }
        self.header.last_timestamp_ns = self.header.last_timestamp_ns.max(timestamp_ns);
        self.header.record_count += 1;
        record.encode_into(timestamp_ns, &mut self.buffer);
    }

    pub fn record_count(&self) -> u32 {
        self.header.record_count
    }

    /// Frame bytes so far, header included.
    pub fn length(&self) -> usize {
        self.buffer.len()
    }

    /// Completes the frame and returns its bytes and header.
    pub fn finish(&mut self, extra_flags: u16, durable_position: u64) -> (&[u8], FrameHeader) {
        debug_assert!(
            self.header.record_count > 0,
            "a frame holds at least one record"
        );
        self.header.flags = extra_flags;
        self.header.frame_length = self.buffer.len() as u32;
        self.header.body_length_plain = (self.buffer.len() - FRAME_HEADER_LENGTH) as u32;
        self.header.durable_position = durable_position;
        self.header
            .encode_fields(&mut self.buffer[..FRAME_HEADER_LENGTH]);
        let crc = crc32c::crc32c(&self.buffer[CRC_START..]);
        write_u32(&mut self.buffer, 4, crc);
        (&self.buffer, self.header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_frame() -> Vec<u8> {
        let mut builder = FrameBuilder::new();
        builder.begin(1000, 2, 7);
        builder.push(&Record::new("orders.1", "hello"), 50);
        builder.push(&Record::new("orders.2", "world"), 40);
        let (bytes, header) = builder.finish(flags::ATOMIC, 64);
        assert_eq!(header.first_timestamp_ns, 50);
        assert_eq!(header.last_timestamp_ns, 50);
        bytes.to_vec()
    }

    #[test]
    fn frame_round_trip() {
        let bytes = sample_frame();
        let FrameCheck::Valid(header) = check_frame(&bytes) else {
            panic!("frame should be valid");
        };
        assert_eq!(header.base_offset, 1000);
        assert_eq!(header.record_count, 2);
        assert_eq!((header.raft_term, header.raft_index), (2, 7));
        assert_eq!(header.durable_position, 64);
        assert!(header.is_atomic());
        let records: Vec<_> = header
            .plain_records(&Bytes::from(bytes))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(records[1].offset, 1001);
        assert_eq!(&records[1].payload[..], b"world");
    }

    #[test]
    fn every_prefix_is_incomplete_and_every_bit_flip_is_detected() {
        let bytes = sample_frame();
        for cut in 0..bytes.len() {
            assert!(
                !matches!(check_frame(&bytes[..cut]), FrameCheck::Valid(_)),
                "cut {cut}"
            );
        }
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(check_frame(&damaged), FrameCheck::Valid(_)),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn zeros_are_empty_not_damage() {
        assert_eq!(
            check_frame(&[0u8; 200]),
            FrameCheck::Defect(FrameDefect::Empty)
        );
        assert_eq!(
            check_frame(&[0u8; 3]),
            FrameCheck::Defect(FrameDefect::Empty)
        );
    }
}
