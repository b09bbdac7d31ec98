//! The stream metadata file `stream.meta` (FORMAT.md 4): the few facts
//! about a log that are not in its segments. Replaced atomically (temp
//! file, fsync, rename, directory fsync) and checksummed; a damaged one is
//! an error, never a default, because defaults here would reuse nonces or
//! forget a Raft vote.

use super::{read_u16, read_u32, read_u64, write_u16, write_u32, write_u64};

pub const METADATA_MAGIC: &[u8; 8] = b"NATSWALM";
pub const METADATA_LENGTH: usize = 128;
pub const METADATA_FILE_NAME: &str = "stream.meta";
const CRC_POSITION: usize = 124;

const FLAG_CLEAN: u32 = 1;
const FLAG_VOTE: u32 = 1 << 1;
const FLAG_VOTE_COMMITTED: u32 = 1 << 2;
const FLAG_COMMITTED: u32 = 1 << 3;
const FLAG_PURGED: u32 = 1 << 4;
const FLAGS_KNOWN: u32 =
    FLAG_CLEAN | FLAG_VOTE | FLAG_VOTE_COMMITTED | FLAG_COMMITTED | FLAG_PURGED;

/// A Raft log id: term and index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct LogId {
    pub term: u64,
    pub index: u64,
}

/// A Raft vote as the log stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vote {
    pub term: u64,
    pub node_id: u64,
    pub committed: bool,
}

/// Where a clean shutdown left the log: everything before `data_length`
/// of the segment at `segment_base` was durable and nothing follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanMark {
    pub segment_base: u64,
    pub data_length: u64,
    /// The offset after the last frame (a repair of a cut segment knows
    /// what was lost).
    pub next_offset: u64,
}

/// Decoded metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamMetadata {
    /// Raised before the first write after every open and every
    /// truncation; slots record it, so bytes of an abandoned tail are never
    /// taken for frames written later.
    pub generation: u32,
    /// Nonce epoch of the frames written in this generation (raised with
    /// it; starts random).
    pub nonce_epoch: u32,
    /// The node whose writer owns the nonces (0 standalone).
    pub node_id: u16,
    /// Set by a clean close, cleared before the next write.
    pub clean: Option<CleanMark>,
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub last_purged: Option<LogId>,
}

impl StreamMetadata {
    pub fn encode(&self) -> [u8; METADATA_LENGTH] {
        let mut bytes = [0u8; METADATA_LENGTH];
        bytes[0..8].copy_from_slice(METADATA_MAGIC);
        write_u16(&mut bytes, 8, super::FORMAT_VERSION);
        write_u16(&mut bytes, 10, METADATA_LENGTH as u16);
        let mut flags = 0;
        if let Some(clean) = self.clean {
            flags |= FLAG_CLEAN;
            write_u64(&mut bytes, 24, clean.segment_base);
            write_u64(&mut bytes, 32, clean.data_length);
            write_u64(&mut bytes, 96, clean.next_offset);
        }
        if let Some(vote) = self.vote {
            flags |= FLAG_VOTE;
            if vote.committed {
                flags |= FLAG_VOTE_COMMITTED;
            }
            write_u64(&mut bytes, 40, vote.term);
            write_u64(&mut bytes, 48, vote.node_id);
        }
        if let Some(committed) = self.committed {
            flags |= FLAG_COMMITTED;
            write_u64(&mut bytes, 56, committed.term);
            write_u64(&mut bytes, 64, committed.index);
        }
        if let Some(purged) = self.last_purged {
            flags |= FLAG_PURGED;
            write_u64(&mut bytes, 72, purged.term);
            write_u64(&mut bytes, 80, purged.index);
        }
        write_u32(&mut bytes, 12, flags);
        write_u32(&mut bytes, 16, self.generation);
        write_u32(&mut bytes, 20, self.nonce_epoch);
        write_u16(&mut bytes, 88, self.node_id);
        let crc = crc32c::crc32c(&bytes[..CRC_POSITION]);
        write_u32(&mut bytes, CRC_POSITION, crc);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<StreamMetadata, String> {
        if bytes.len() != METADATA_LENGTH {
            return Err(format!(
                "metadata is {} bytes, format version {} has {METADATA_LENGTH}",
                bytes.len(),
                super::FORMAT_VERSION
            ));
        }
        if &bytes[0..8] != METADATA_MAGIC {
            return Err("bad metadata magic".to_string());
        }
        if crc32c::crc32c(&bytes[..CRC_POSITION]) != read_u32(bytes, CRC_POSITION) {
            return Err("metadata checksum mismatch".to_string());
        }
        let version = read_u16(bytes, 8);
        if version != super::FORMAT_VERSION {
            return Err(format!(
                "metadata format version {version}, this natswal reads {}",
                super::FORMAT_VERSION
            ));
        }
        let flags = read_u32(bytes, 12);
        if flags & !FLAGS_KNOWN != 0 || read_u16(bytes, 10) as usize != METADATA_LENGTH {
            return Err(format!("metadata flags {flags:#x} not understood"));
        }
        let present = |flag: u32| flags & flag != 0;
        Ok(StreamMetadata {
            generation: read_u32(bytes, 16),
            nonce_epoch: read_u32(bytes, 20),
            node_id: read_u16(bytes, 88),
            clean: present(FLAG_CLEAN).then(|| CleanMark {
                segment_base: read_u64(bytes, 24),
                data_length: read_u64(bytes, 32),
                next_offset: read_u64(bytes, 96),
            }),
            vote: present(FLAG_VOTE).then(|| Vote {
                term: read_u64(bytes, 40),
                node_id: read_u64(bytes, 48),
                committed: present(FLAG_VOTE_COMMITTED),
            }),
            committed: present(FLAG_COMMITTED).then(|| LogId {
                term: read_u64(bytes, 56),
                index: read_u64(bytes, 64),
            }),
            last_purged: present(FLAG_PURGED).then(|| LogId {
                term: read_u64(bytes, 72),
                index: read_u64(bytes, 80),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_any_flipped_bit_is_an_error() {
        let metadata = StreamMetadata {
            generation: 7,
            nonce_epoch: 0x8000_0001,
            node_id: 3,
            clean: Some(CleanMark {
                segment_base: 100,
                data_length: 4096,
                next_offset: 700,
            }),
            vote: Some(Vote {
                term: 5,
                node_id: 2,
                committed: true,
            }),
            committed: Some(LogId { term: 5, index: 40 }),
            last_purged: None,
        };
        let bytes = metadata.encode();
        assert_eq!(StreamMetadata::decode(&bytes), Ok(metadata));
        for bit in 0..METADATA_LENGTH * 8 {
            let mut damaged = bytes;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(StreamMetadata::decode(&damaged).is_err(), "bit {bit}");
        }
        assert!(StreamMetadata::decode(&bytes[..100]).is_err());
    }
}
