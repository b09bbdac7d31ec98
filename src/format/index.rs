//! Index file (FORMAT.md 3): sparse offset, time and Raft index of one
//! segment, also used as the active segment's checkpoint. Derived data: any
//! defect means "rebuild from the log", never "refuse to open".

use super::{read_i64, read_u16, read_u32, read_u64, write_i64, write_u16, write_u32, write_u64};

pub const INDEX_MAGIC: &[u8; 8] = b"NATSWALI";
pub const INDEX_HEADER_LENGTH: usize = 128;
pub const INDEX_ENTRY_LENGTH: usize = 24;
const HEADER_CRC_POSITION: usize = 124;

pub const INDEX_FLAG_SEALED: u32 = 1;

/// One sparse index entry: where a frame's slot starts and what came
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Frame base offset minus the segment base offset.
    pub relative_offset: u32,
    /// Byte position of the frame's slot in the segment.
    pub position: u32,
    /// Largest timestamp of all frames before this one in the segment.
    pub timestamp_max_before: i64,
    /// Frame Raft index minus the segment's first Raft index (0 standalone).
    pub relative_raft_index: u32,
}

/// Decoded index header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexHeader {
    pub flags: u32,
    pub base_offset: u64,
    pub next_offset: u64,
    pub data_length: u64,
    pub first_timestamp_ns: i64,
    pub last_timestamp_ns: i64,
    pub segment_crc: u32,
    pub record_count: u64,
    /// The segment header's salt: an index of an earlier file of the same
    /// name never matches.
    pub salt: u64,
    /// Raft index of the segment's first frame (0: none or standalone).
    pub first_raft_index: u64,
    pub last_raft_term: u64,
    pub last_raft_index: u64,
}

impl IndexHeader {
    pub fn is_sealed(&self) -> bool {
        self.flags & INDEX_FLAG_SEALED != 0
    }
}

/// Encodes a whole index file.
pub fn encode_index(header: &IndexHeader, entries: &[IndexEntry]) -> Vec<u8> {
    let mut bytes = vec![0u8; INDEX_HEADER_LENGTH + entries.len() * INDEX_ENTRY_LENGTH + 4];
    bytes[0..8].copy_from_slice(INDEX_MAGIC);
    write_u16(&mut bytes, 8, super::FORMAT_VERSION);
    write_u16(&mut bytes, 10, INDEX_HEADER_LENGTH as u16);
    write_u32(&mut bytes, 12, header.flags);
    write_u64(&mut bytes, 16, header.base_offset);
    write_u64(&mut bytes, 24, header.next_offset);
    write_u64(&mut bytes, 32, header.data_length);
    write_i64(&mut bytes, 40, header.first_timestamp_ns);
    write_i64(&mut bytes, 48, header.last_timestamp_ns);
    write_u32(&mut bytes, 56, entries.len() as u32);
    write_u32(&mut bytes, 60, header.segment_crc);
    write_u64(&mut bytes, 64, header.record_count);
    write_u64(&mut bytes, 72, header.salt);
    write_u64(&mut bytes, 80, header.first_raft_index);
    write_u64(&mut bytes, 88, header.last_raft_term);
    write_u64(&mut bytes, 96, header.last_raft_index);
    let crc = crc32c::crc32c(&bytes[..HEADER_CRC_POSITION]);
    write_u32(&mut bytes, HEADER_CRC_POSITION, crc);
    let mut position = INDEX_HEADER_LENGTH;
    for entry in entries {
        write_u32(&mut bytes, position, entry.relative_offset);
        write_u32(&mut bytes, position + 4, entry.position);
        write_i64(&mut bytes, position + 8, entry.timestamp_max_before);
        write_u32(&mut bytes, position + 16, entry.relative_raft_index);
        position += INDEX_ENTRY_LENGTH;
    }
    let entries_crc = crc32c::crc32c(&bytes[INDEX_HEADER_LENGTH..position]);
    write_u32(&mut bytes, position, entries_crc);
    bytes
}

/// Decodes only the header (the first 128 bytes), checking its checksum.
pub fn decode_index_header(bytes: &[u8]) -> Result<(IndexHeader, u32), String> {
    if bytes.len() < INDEX_HEADER_LENGTH {
        return Err(format!(
            "index is {} bytes, shorter than its header",
            bytes.len()
        ));
    }
    if &bytes[0..8] != INDEX_MAGIC {
        return Err("bad index magic".to_string());
    }
    if crc32c::crc32c(&bytes[..HEADER_CRC_POSITION]) != read_u32(bytes, HEADER_CRC_POSITION) {
        return Err("index header checksum mismatch".to_string());
    }
    let version = read_u16(bytes, 8);
    if version != super::FORMAT_VERSION {
        return Err(format!("index format version {version} is not supported"));
    }
    if read_u16(bytes, 10) as usize != INDEX_HEADER_LENGTH {
        return Err("index header length not understood".to_string());
    }
    let header = IndexHeader {
        flags: read_u32(bytes, 12),
        base_offset: read_u64(bytes, 16),
        next_offset: read_u64(bytes, 24),
        data_length: read_u64(bytes, 32),
        first_timestamp_ns: read_i64(bytes, 40),
        last_timestamp_ns: read_i64(bytes, 48),
        segment_crc: read_u32(bytes, 60),
        record_count: read_u64(bytes, 64),
        salt: read_u64(bytes, 72),
        first_raft_index: read_u64(bytes, 80),
        last_raft_term: read_u64(bytes, 88),
        last_raft_index: read_u64(bytes, 96),
    };
    Ok((header, read_u32(bytes, 56)))
}

/// Decodes a whole index file, checking both checksums and that the entry
/// count matches the file length exactly (so a damaged count cannot make the
/// decoder allocate more than the file holds).
pub fn decode_index(bytes: &[u8]) -> Result<(IndexHeader, Vec<IndexEntry>), String> {
    let (header, entry_count) = decode_index_header(bytes)?;
    let expected_length =
        INDEX_HEADER_LENGTH as u64 + u64::from(entry_count) * INDEX_ENTRY_LENGTH as u64 + 4;
    if bytes.len() as u64 != expected_length {
        return Err(format!(
            "index holds {} bytes, {entry_count} entries need {expected_length}",
            bytes.len()
        ));
    }
    let entries_end = bytes.len() - 4;
    if crc32c::crc32c(&bytes[INDEX_HEADER_LENGTH..entries_end]) != read_u32(bytes, entries_end) {
        return Err("index entries checksum mismatch".to_string());
    }
    let entries: Vec<IndexEntry> = bytes[INDEX_HEADER_LENGTH..entries_end]
        .chunks_exact(INDEX_ENTRY_LENGTH)
        .map(|chunk| IndexEntry {
            relative_offset: read_u32(chunk, 0),
            position: read_u32(chunk, 4),
            timestamp_max_before: read_i64(chunk, 8),
            relative_raft_index: read_u32(chunk, 16),
        })
        .collect();
    let ordered = entries.windows(2).all(|pair| {
        pair[0].relative_offset <= pair[1].relative_offset
            && pair[0].position < pair[1].position
            && pair[0].timestamp_max_before <= pair[1].timestamp_max_before
            && pair[0].relative_raft_index <= pair[1].relative_raft_index
    });
    if !ordered {
        return Err("index entries are not in order".to_string());
    }
    if entries
        .iter()
        .any(|entry| u64::from(entry.position) >= header.data_length)
    {
        return Err("index entry points past the covered data".to_string());
    }
    Ok((header, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (IndexHeader, Vec<IndexEntry>) {
        let header = IndexHeader {
            flags: INDEX_FLAG_SEALED,
            base_offset: 10,
            next_offset: 500,
            data_length: 100_000,
            first_timestamp_ns: 1,
            last_timestamp_ns: 99,
            segment_crc: 0xdead_beef,
            record_count: 490,
            salt: 77,
            first_raft_index: 3,
            last_raft_term: 2,
            last_raft_index: 90,
        };
        let entries = vec![
            IndexEntry {
                relative_offset: 0,
                position: 64,
                timestamp_max_before: i64::MIN,
                relative_raft_index: 0,
            },
            IndexEntry {
                relative_offset: 200,
                position: 40_000,
                timestamp_max_before: 50,
                relative_raft_index: 40,
            },
        ];
        (header, entries)
    }

    #[test]
    fn index_round_trip_and_bit_flips_are_detected() {
        let (header, entries) = sample();
        let bytes = encode_index(&header, &entries);
        assert_eq!(decode_index(&bytes).unwrap(), (header, entries));
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_index(&damaged).is_err(), "bit {bit}");
        }
        assert!(decode_index(&bytes[..bytes.len() - 1]).is_err());
    }
}
