//! Batch frame and the slot that holds it in a segment (FORMAT.md 2.2,
//! 2.3). A frame is the unit of writing, checksumming, compressing,
//! encrypting and replicating; it is valid only as a whole. Its bytes do
//! not depend on where it is stored, so a follower stores exactly the
//! leader's bytes. What is local to one segment file (the durability
//! watermark, the write generation, the file's salt) is in the slot header
//! in front of the frame.

use super::record::{Record, RecordIter};
use super::{read_i64, read_u16, read_u32, read_u64, write_i64, write_u16, write_u32, write_u64};
use bytes::Bytes;

pub const FRAME_MAGIC: &[u8; 4] = b"NWF2";
pub const FRAME_HEADER_LENGTH: usize = 96;
pub const SLOT_HEADER_LENGTH: usize = 16;
/// Bytes of the frame header before the range its header checksum covers.
const HEADER_CRC_START: usize = 8;
/// Position of the body checksum inside the frame header.
const BODY_CRC_POSITION: usize = 12;
/// Payloads at least this long are written from their own buffer
/// (`pwritev`) instead of being copied into the frame buffer.
pub const GATHER_BYTES_MIN: usize = 1024;

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
    /// Every flag bit version 2 defines.
    pub const KNOWN: u16 = COMPRESSION_MASK | ENCRYPTED | ATOMIC;
}

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrameKind {
    /// `record_count` records (at least one), offsets `base_offset..`.
    #[default]
    Records,
    /// A Raft blank entry: no records, no offsets, empty body.
    Blank,
    /// A Raft entry that is not records (membership): an opaque body, no
    /// offsets.
    Opaque,
    /// Offsets `base_offset..base_offset + record_count` whose frame an
    /// explicit repair moved to quarantine; empty body.
    Gap,
}

impl FrameKind {
    pub fn id(self) -> u8 {
        match self {
            FrameKind::Records => 0,
            FrameKind::Blank => 1,
            FrameKind::Opaque => 2,
            FrameKind::Gap => 3,
        }
    }

    pub fn from_id(id: u8) -> Option<FrameKind> {
        match id {
            0 => Some(FrameKind::Records),
            1 => Some(FrameKind::Blank),
            2 => Some(FrameKind::Opaque),
            3 => Some(FrameKind::Gap),
            _ => None,
        }
    }

    /// True for kinds whose offsets are part of the stream's numbering.
    pub fn takes_offsets(self) -> bool {
        matches!(self, FrameKind::Records | FrameKind::Gap)
    }
}

/// Decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameHeader {
    pub frame_length: u32,
    pub body_crc: u32,
    pub base_offset: u64,
    pub record_count: u32,
    pub body_length_plain: u32,
    pub first_timestamp_ns: i64,
    pub last_timestamp_ns: i64,
    pub raft_term: u64,
    pub raft_index: u64,
    pub flags: u16,
    pub kind: FrameKind,
    /// AEAD of an encrypted body: 0 none, 1 AES-256-GCM, 2 ChaCha20-Poly1305.
    pub cipher: u8,
    /// Key id of an encrypted body; 0 when plain.
    pub key_id: u32,
    pub nonce: [u8; 12],
}

impl FrameHeader {
    /// Offset one past the frame's offsets (its own base for frames that
    /// take none).
    pub fn next_offset(&self) -> u64 {
        if self.kind.takes_offsets() {
            self.base_offset + u64::from(self.record_count)
        } else {
            self.base_offset
        }
    }

    pub fn is_atomic(&self) -> bool {
        self.flags & flags::ATOMIC != 0
    }

    pub fn is_encrypted(&self) -> bool {
        self.flags & flags::ENCRYPTED != 0
    }

    pub fn is_compressed(&self) -> bool {
        self.flags & flags::COMPRESSION_MASK != 0
    }

    /// Records actually stored (gaps and Raft entries hold none).
    pub fn stored_records(&self) -> u32 {
        if self.kind == FrameKind::Records {
            self.record_count
        } else {
            0
        }
    }

    /// The 96 header bytes, checksums included.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LENGTH] {
        let mut bytes = self.encode_associated_data();
        write_u32(&mut bytes, BODY_CRC_POSITION, self.body_crc);
        let crc = crc32c::crc32c(&bytes[HEADER_CRC_START..]);
        write_u32(&mut bytes, 4, crc);
        bytes
    }

    /// The header with both checksums zero: bytes `[8, 96)` of it are the
    /// AEAD's associated data (the body checksum is computed over the
    /// ciphertext, after sealing).
    pub fn encode_associated_data(&self) -> [u8; FRAME_HEADER_LENGTH] {
        let mut out = [0u8; FRAME_HEADER_LENGTH];
        out[0..4].copy_from_slice(FRAME_MAGIC);
        write_u32(&mut out, 8, self.frame_length);
        write_u64(&mut out, 16, self.base_offset);
        write_u32(&mut out, 24, self.record_count);
        write_u32(&mut out, 28, self.body_length_plain);
        write_i64(&mut out, 32, self.first_timestamp_ns);
        write_i64(&mut out, 40, self.last_timestamp_ns);
        write_u64(&mut out, 48, self.raft_term);
        write_u64(&mut out, 56, self.raft_index);
        write_u16(&mut out, 64, self.flags);
        out[66] = self.kind.id();
        out[67] = self.cipher;
        write_u32(&mut out, 68, self.key_id);
        out[72..84].copy_from_slice(&self.nonce);
        write_u16(&mut out, 84, FRAME_HEADER_LENGTH as u16);
        out
    }

    /// Records of a frame with a plain body (not compressed, not encrypted).
    pub fn plain_records(&self, frame: &Bytes) -> RecordIter {
        let body = frame.slice(FRAME_HEADER_LENGTH..self.frame_length as usize);
        RecordIter::new(body, self.base_offset, self.stored_records())
    }
}

/// Why bytes at a position are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameDefect {
    /// Only zeros: nothing was written here.
    Empty,
    /// The frame claims more bytes than are available.
    Incomplete {
        frame_length: u64,
        available: u64,
    },
    BadMagic,
    BadHeaderChecksum,
    BadLength(u32),
    /// The header is intact (its length can be trusted), the body is not.
    BadBodyChecksum,
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
            FrameDefect::BadHeaderChecksum => write!(formatter, "frame header checksum mismatch"),
            FrameDefect::BadLength(length) => write!(formatter, "impossible frame length {length}"),
            FrameDefect::BadBodyChecksum => write!(formatter, "frame body checksum mismatch"),
        }
    }
}

/// Result of checking the bytes at a frame position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameCheck {
    Valid(FrameHeader),
    /// Not a frame: torn, empty or damaged.
    Defect(FrameDefect),
    /// The header checksum matches but the header uses something version 2
    /// does not define: a format error, never treated as a torn write.
    Unsupported(String),
}

/// Checks the 96-byte header at `bytes[0]` (no body). `Valid` means its
/// checksum matches and every field is one version 2 understands.
pub fn check_header(bytes: &[u8]) -> FrameCheck {
    if bytes.len() < FRAME_HEADER_LENGTH {
        if bytes.iter().all(|byte| *byte == 0) {
            return FrameCheck::Defect(FrameDefect::Empty);
        }
        return FrameCheck::Defect(FrameDefect::Incomplete {
            frame_length: FRAME_HEADER_LENGTH as u64,
            available: bytes.len() as u64,
        });
    }
    let header_bytes = &bytes[..FRAME_HEADER_LENGTH];
    if &header_bytes[0..4] != FRAME_MAGIC {
        if header_bytes.iter().all(|byte| *byte == 0) {
            return FrameCheck::Defect(FrameDefect::Empty);
        }
        return FrameCheck::Defect(FrameDefect::BadMagic);
    }
    if crc32c::crc32c(&header_bytes[HEADER_CRC_START..]) != read_u32(header_bytes, 4) {
        return FrameCheck::Defect(FrameDefect::BadHeaderChecksum);
    }
    match decode_fields(header_bytes) {
        Ok(header) => FrameCheck::Valid(header),
        Err(reason) => FrameCheck::Unsupported(reason),
    }
}

/// Decodes and checks the fields of a header whose checksum matched.
fn decode_fields(bytes: &[u8]) -> Result<FrameHeader, String> {
    let header_length = read_u16(bytes, 84) as usize;
    if header_length != FRAME_HEADER_LENGTH {
        return Err(format!(
            "frame header length {header_length}, version 2 defines {FRAME_HEADER_LENGTH}"
        ));
    }
    if bytes[86..96].iter().any(|byte| *byte != 0) {
        return Err("reserved frame header bytes are not zero".to_string());
    }
    let kind =
        FrameKind::from_id(bytes[66]).ok_or_else(|| format!("unknown frame kind {}", bytes[66]))?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&bytes[72..84]);
    let header = FrameHeader {
        frame_length: read_u32(bytes, 8),
        body_crc: read_u32(bytes, BODY_CRC_POSITION),
        base_offset: read_u64(bytes, 16),
        record_count: read_u32(bytes, 24),
        body_length_plain: read_u32(bytes, 28),
        first_timestamp_ns: read_i64(bytes, 32),
        last_timestamp_ns: read_i64(bytes, 40),
        raft_term: read_u64(bytes, 48),
        raft_index: read_u64(bytes, 56),
        flags: read_u16(bytes, 64),
        kind,
        cipher: bytes[67],
        key_id: read_u32(bytes, 68),
        nonce,
    };
    check_fields(&header)?;
    Ok(header)
}

fn check_fields(header: &FrameHeader) -> Result<(), String> {
    if (header.frame_length as usize) < FRAME_HEADER_LENGTH {
        return Err(format!(
            "frame length {} is below its header",
            header.frame_length
        ));
    }
    if header.flags & !flags::KNOWN != 0 {
        return Err(format!("unknown frame flags {:#06x}", header.flags));
    }
    if header.flags & flags::COMPRESSION_MASK > flags::COMPRESSION_ZSTD {
        return Err(format!(
            "unknown compression codec {}",
            header.flags & flags::COMPRESSION_MASK
        ));
    }
    let body_length = header.frame_length as usize - FRAME_HEADER_LENGTH;
    if header.is_encrypted() {
        if header.cipher == 0 || header.cipher > 2 || header.key_id == 0 {
            return Err(format!(
                "encrypted frame with cipher {} and key id {}",
                header.cipher, header.key_id
            ));
        }
    } else if header.cipher != 0 || header.key_id != 0 || header.nonce != [0; 12] {
        return Err("plain frame with a cipher, key id or nonce".to_string());
    }
    match header.kind {
        FrameKind::Records if header.record_count == 0 => {
            return Err("records frame with zero records".to_string())
        }
        // A gap without offsets stands for lost Raft entries that held
        // none (blank, membership): the jump in Raft indexes after it is
        // expected, and a restore from a peer fills it.
        FrameKind::Gap if body_length != 0 => return Err("gap frame with a body".to_string()),
        FrameKind::Blank if header.record_count != 0 || body_length != 0 => {
            return Err("blank frame with records or a body".to_string())
        }
        FrameKind::Opaque if header.record_count != 0 => {
            return Err("opaque frame with records".to_string())
        }
        _ => {}
    }
    if header
        .base_offset
        .checked_add(u64::from(header.record_count))
        .is_none()
    {
        return Err("frame offsets overflow".to_string());
    }
    let transformed = header.is_compressed() || header.is_encrypted();
    if !transformed && header.body_length_plain as usize != body_length {
        return Err(format!(
            "plain body of {body_length} bytes but header says {}",
            header.body_length_plain
        ));
    }
    Ok(())
}

/// Checks the whole frame at `bytes[0]`: header, then the body checksum.
/// `bytes` ends where the readable data ends; nothing outside it is read.
pub fn check_frame(bytes: &[u8]) -> FrameCheck {
    let header = match check_header(bytes) {
        FrameCheck::Valid(header) => header,
        other => return other,
    };
    let length = header.frame_length as usize;
    if length > bytes.len() {
        return FrameCheck::Defect(FrameDefect::Incomplete {
            frame_length: length as u64,
            available: bytes.len() as u64,
        });
    }
    if crc32c::crc32c(&bytes[FRAME_HEADER_LENGTH..length]) != header.body_crc {
        return FrameCheck::Defect(FrameDefect::BadBodyChecksum);
    }
    FrameCheck::Valid(header)
}

/// Segment-local facts about the frame that follows (FORMAT.md 2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotHeader {
    /// Must equal the frame's own `frame_length` (a second copy, so a
    /// damaged frame header can still be stepped over).
    pub frame_length: u32,
    /// Every byte of the segment below this was durable when the frame was
    /// written.
    pub durable_position: u32,
    /// The stream's write generation when the frame was written.
    pub generation: u32,
}

/// The CRC32C state after a segment's salt: the seed of its slot checksums.
pub fn salt_state(salt: u64) -> u32 {
    crc32c::crc32c(&salt.to_le_bytes())
}

impl SlotHeader {
    pub fn encode(&self, salt_state: u32) -> [u8; SLOT_HEADER_LENGTH] {
        let mut bytes = [0u8; SLOT_HEADER_LENGTH];
        write_u32(&mut bytes, 4, self.frame_length);
        write_u32(&mut bytes, 8, self.durable_position);
        write_u32(&mut bytes, 12, self.generation);
        let crc = crc32c::crc32c_append(salt_state, &bytes[4..]);
        write_u32(&mut bytes, 0, crc);
        bytes
    }

    /// The slot header at `bytes[0]` if its checksum matches under this
    /// segment's salt. A payload cannot hold one: its author does not know
    /// the salt.
    pub fn decode(bytes: &[u8], salt_state: u32) -> Option<SlotHeader> {
        if bytes.len() < SLOT_HEADER_LENGTH {
            return None;
        }
        let slot = &bytes[..SLOT_HEADER_LENGTH];
        if crc32c::crc32c_append(salt_state, &slot[4..]) != read_u32(slot, 0) {
            return None;
        }
        Some(SlotHeader {
            frame_length: read_u32(slot, 4),
            durable_position: read_u32(slot, 8),
            generation: read_u32(slot, 12),
        })
    }
}

/// One contiguous part of a frame body being built.
#[derive(Debug, Clone)]
enum Piece {
    /// `[start, end)` of the builder's own buffer.
    Copied { start: usize, end: usize },
    /// A payload written from its own buffer.
    Shared(Bytes),
}

/// Builds the plain body of a records frame: record headers, subjects and
/// small payloads are copied into one buffer, large payloads stay in their
/// own `Bytes` and are written with `pwritev`. The body checksum is kept as
/// the body grows.
#[derive(Debug, Default)]
pub struct FrameBuilder {
    buffer: Vec<u8>,
    pieces: Vec<Piece>,
    copied_from: usize,
    body_length: usize,
    body_crc: u32,
    record_count: u32,
    first_timestamp_ns: i64,
    last_timestamp_ns: i64,
}

impl FrameBuilder {
    pub fn new() -> FrameBuilder {
        FrameBuilder::default()
    }

    /// Starts a new body, discarding any unfinished one.
    pub fn begin(&mut self) {
        self.buffer.clear();
        self.pieces.clear();
        self.copied_from = 0;
        self.body_length = 0;
        self.body_crc = 0;
        self.record_count = 0;
        self.first_timestamp_ns = 0;
        self.last_timestamp_ns = i64::MIN;
    }

    /// Adds a record (the caller has checked its lengths).
    pub fn push(&mut self, record: &Record, timestamp_ns: i64) {
        if self.record_count == 0 {
            self.first_timestamp_ns = timestamp_ns;
        }
        self.last_timestamp_ns = self.last_timestamp_ns.max(timestamp_ns);
        self.record_count += 1;
        record.encode_prefix_into(timestamp_ns, &mut self.buffer);
        if record.payload.len() >= GATHER_BYTES_MIN {
            self.close_copied();
            self.body_crc = crc32c::crc32c_append(self.body_crc, &record.payload);
            self.body_length += record.payload.len();
            self.pieces.push(Piece::Shared(record.payload.clone()));
        } else {
            self.buffer.extend_from_slice(&record.payload);
        }
    }

    /// Ends the current copied piece (its checksum is added here, in order).
    fn close_copied(&mut self) {
        let end = self.buffer.len();
        if end > self.copied_from {
            let copied = &self.buffer[self.copied_from..end];
            self.body_crc = crc32c::crc32c_append(self.body_crc, copied);
            self.body_length += copied.len();
            self.pieces.push(Piece::Copied {
                start: self.copied_from,
                end,
            });
            self.copied_from = end;
        }
    }

    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    pub fn first_timestamp_ns(&self) -> i64 {
        self.first_timestamp_ns
    }

    pub fn last_timestamp_ns(&self) -> i64 {
        self.last_timestamp_ns
    }

    /// Bytes of the plain body so far.
    pub fn body_length(&self) -> usize {
        self.body_length + (self.buffer.len() - self.copied_from)
    }

    /// Completes the body: its length and checksum.
    pub fn seal(&mut self) -> (usize, u32) {
        self.close_copied();
        (self.body_length, self.body_crc)
    }

    /// The body's parts in order (after [`seal`](FrameBuilder::seal)).
    pub fn body_parts(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().map(|piece| match piece {
            Piece::Copied { start, end } => &self.buffer[*start..*end],
            Piece::Shared(bytes) => &bytes[..],
        })
    }

    /// The body as one buffer (for compression and encryption).
    pub fn body_contiguous(&self, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(self.body_length);
        for part in self.body_parts() {
            out.extend_from_slice(part);
        }
    }
}

/// Builds a complete plain records frame in one buffer (tests, repair,
/// offline tools).
pub fn encode_plain_frame(
    base_offset: u64,
    records: &[(Record, i64)],
    frame_flags: u16,
    raft_term: u64,
    raft_index: u64,
) -> Vec<u8> {
    let mut builder = FrameBuilder::new();
    builder.begin();
    for (record, timestamp_ns) in records {
        builder.push(record, *timestamp_ns);
    }
    let (body_length, body_crc) = builder.seal();
    let header = FrameHeader {
        frame_length: (FRAME_HEADER_LENGTH + body_length) as u32,
        body_crc,
        base_offset,
        record_count: builder.record_count(),
        body_length_plain: body_length as u32,
        first_timestamp_ns: builder.first_timestamp_ns(),
        last_timestamp_ns: builder.last_timestamp_ns(),
        raft_term,
        raft_index,
        flags: frame_flags & flags::ATOMIC,
        ..FrameHeader::default()
    };
    let mut bytes = header.encode().to_vec();
    for part in builder.body_parts() {
        bytes.extend_from_slice(part);
    }
    bytes
}

/// A frame that takes offsets but holds no records (a repair's gap) or an
/// empty Raft entry, as bytes.
pub fn encode_empty_frame(
    kind: FrameKind,
    base_offset: u64,
    offsets: u32,
    raft_term: u64,
    raft_index: u64,
) -> Vec<u8> {
    let header = FrameHeader {
        frame_length: FRAME_HEADER_LENGTH as u32,
        body_crc: crc32c::crc32c(&[]),
        base_offset,
        record_count: offsets,
        kind,
        raft_term,
        raft_index,
        ..FrameHeader::default()
    };
    header.encode().to_vec()
}

/// One slot of a segment image as [`slot_chain`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainedSlot {
    /// Byte position of the slot header; the frame follows 16 bytes later.
    pub position: usize,
    pub slot: SlotHeader,
    pub frame: FrameCheck,
}

impl ChainedSlot {
    /// Where the next slot begins (after this slot's frame).
    pub fn end(&self) -> usize {
        self.position + SLOT_HEADER_LENGTH + self.slot.frame_length as usize
    }
}

/// The slots of a whole segment image, for tools and tests that inspect a
/// file (recovery's walker is `log/walker.rs`): from the first slot after
/// the header, each where the previous one's length ends, up to the first
/// slot header that does not verify under the header's salt. The frame of
/// every listed slot is checked; a damaged one ends the chain after it.
/// Empty when the segment header does not decode.
pub fn slot_chain(segment: &[u8]) -> Vec<ChainedSlot> {
    use super::segment_header::{SegmentHeader, SEGMENT_HEADER_LENGTH};
    let mut chain = Vec::new();
    let Ok(header) = SegmentHeader::decode(segment, std::path::Path::new("segment")) else {
        return chain;
    };
    let state = salt_state(header.salt);
    let mut position = SEGMENT_HEADER_LENGTH;
    while position + SLOT_HEADER_LENGTH <= segment.len() {
        let Some(slot) = SlotHeader::decode(&segment[position..], state) else {
            break;
        };
        let frame = check_frame(&segment[position + SLOT_HEADER_LENGTH..]);
        let valid = matches!(frame, FrameCheck::Valid(_));
        let chained = ChainedSlot {
            position,
            slot,
            frame,
        };
        position = chained.end();
        chain.push(chained);
        if !valid {
            break;
        }
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_frame() -> Vec<u8> {
        let records = [
            (Record::new("orders.1", "hello"), 50),
            (Record::new("orders.2", vec![7u8; 3000]), 40),
        ];
        encode_plain_frame(1000, &records, flags::ATOMIC, 2, 7)
    }

    #[test]
    fn frame_round_trip_with_a_gathered_payload() {
        let bytes = sample_frame();
        let FrameCheck::Valid(header) = check_frame(&bytes) else {
            panic!("frame should be valid: {:?}", check_frame(&bytes));
        };
        assert_eq!(header.base_offset, 1000);
        assert_eq!(header.record_count, 2);
        assert_eq!((header.raft_term, header.raft_index), (2, 7));
        assert_eq!(header.first_timestamp_ns, 50);
        assert_eq!(header.last_timestamp_ns, 50);
        assert!(header.is_atomic());
        let records: Vec<_> = header
            .plain_records(&Bytes::from(bytes))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(records[1].offset, 1001);
        assert_eq!(&records[1].payload[..], &[7u8; 3000][..]);
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
            let check = check_frame(&damaged);
            assert!(!matches!(check, FrameCheck::Valid(_)), "bit {bit}");
            if bit / 8 >= FRAME_HEADER_LENGTH {
                assert_eq!(
                    check,
                    FrameCheck::Defect(FrameDefect::BadBodyChecksum),
                    "a body flip leaves the header (and its length) trusted"
                );
            }
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

    #[test]
    fn slot_headers_verify_only_under_their_salt() {
        let slot = SlotHeader {
            frame_length: 500,
            durable_position: 64,
            generation: 3,
        };
        let state = salt_state(0x1234_5678_9abc_def0);
        let bytes = slot.encode(state);
        assert_eq!(SlotHeader::decode(&bytes, state), Some(slot));
        assert_eq!(SlotHeader::decode(&bytes, salt_state(1)), None);
        assert_eq!(SlotHeader::decode(&[0u8; 16], state), None);
        for bit in 0..SLOT_HEADER_LENGTH * 8 {
            let mut damaged = bytes;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(SlotHeader::decode(&damaged, state), None, "bit {bit}");
        }
    }

    #[test]
    fn empty_frames_take_offsets_only_when_they_are_gaps() {
        let gap = encode_empty_frame(FrameKind::Gap, 10, 5, 0, 0);
        let FrameCheck::Valid(header) = check_frame(&gap) else {
            panic!()
        };
        assert_eq!(header.next_offset(), 15);
        assert_eq!(header.stored_records(), 0);
        let blank = encode_empty_frame(FrameKind::Blank, 10, 0, 3, 9);
        let FrameCheck::Valid(header) = check_frame(&blank) else {
            panic!()
        };
        assert_eq!(header.next_offset(), 10);
        let lost_entries = encode_empty_frame(FrameKind::Gap, 10, 0, 0, 0);
        let FrameCheck::Valid(header) = check_frame(&lost_entries) else {
            panic!()
        };
        assert_eq!(header.next_offset(), 10, "a gap of lost Raft entries");
    }
}
