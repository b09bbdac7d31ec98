//! Per-stream engine configuration, with defaults that suit a single node and
//! validation that names the offending key.

use crate::codec::{Compression, EncryptionConfig};
use crate::error::{Error, Result};
use crate::format::frame::{FRAME_HEADER_LENGTH, SLOT_HEADER_LENGTH};
use crate::format::record::RECORD_OVERHEAD;
use crate::format::segment_header::SEGMENT_HEADER_LENGTH;

/// Default distance between sparse index entries.
pub const INDEX_INTERVAL_DEFAULT: u64 = 32 * 1024;

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Written to the page cache (survives a process crash, not power loss).
    None,
    /// Written to the page cache; a background sync runs every `interval_ms`.
    Interval { interval_ms: u64 },
    /// Synced to disk (group commit) before the append resolves.
    #[default]
    Fsync,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Durability::None => formatter.write_str("none"),
            Durability::Interval { interval_ms } => write!(formatter, "interval({interval_ms} ms)"),
            Durability::Fsync => formatter.write_str("fsync"),
        }
    }
}

/// Retention limits; whole sealed segments are deleted oldest first while a
/// limit is exceeded. The active segment is never deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionPolicy {
    /// Delete a sealed segment once its newest record is older than this.
    pub age_max_ms: Option<u64>,
    /// Keep the stream's bytes at or below this.
    pub bytes_max: Option<u64>,
    /// Keep the stream's record count at or below this.
    pub messages_max: Option<u64>,
}

/// Configuration of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    pub durability: Durability,
    /// Size of a segment file; the active one is allocated to it.
    pub segment_bytes_max: u64,
    /// Seal the active segment once its first record is this old.
    pub segment_age_max_ms: Option<u64>,
    pub retention: RetentionPolicy,
    /// Largest record (subject + headers + payload + 18 bytes).
    pub record_bytes_max: u64,
    /// Adaptive batching: a frame grows under load up to this many bytes...
    pub frame_bytes_max: u64,
    /// ...and this many records.
    pub frame_records_max: u32,
    /// Bytes of appends waiting for the writer; beyond it producers wait.
    pub queue_bytes_max: u64,
    /// Bytes written but not yet synced before the writer waits for the syncer.
    pub unsynced_bytes_max: u64,
    /// Distance between sparse index entries.
    pub index_interval_bytes: u64,
    /// The active segment's checkpoint is rewritten after this many bytes.
    pub checkpoint_interval_bytes: u64,
    /// How often the writer checks age rotation and retention when idle.
    pub maintenance_interval_ms: u64,
    /// Compression of each batch frame.
    pub compression: Compression,
    /// Encryption of new segments (keys come from the stream's keyring).
    pub encryption: Option<EncryptionConfig>,
    /// Segment files retention keeps for reuse by new segments (writing
    /// over blocks already allocated creates no new extents and no discard
    /// in steady state); beyond this they are deleted.
    pub recycle_segments_max: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            durability: Durability::Fsync,
            segment_bytes_max: 128 * 1024 * 1024,
            segment_age_max_ms: None,
            retention: RetentionPolicy::default(),
            record_bytes_max: 8 * 1024 * 1024,
            frame_bytes_max: 1024 * 1024,
            frame_records_max: 16 * 1024,
            queue_bytes_max: 64 * 1024 * 1024,
            unsynced_bytes_max: 64 * 1024 * 1024,
            index_interval_bytes: INDEX_INTERVAL_DEFAULT,
            checkpoint_interval_bytes: 32 * 1024 * 1024,
            maintenance_interval_ms: 1000,
            compression: Compression::None,
            encryption: None,
            recycle_segments_max: 2,
        }
    }
}

fn invalid(key: &str, reason: String) -> Error {
    Error::InvalidConfig {
        key: key.to_string(),
        reason,
    }
}

impl StreamConfig {
    /// Largest frame (its slot included) a segment can hold.
    pub fn frame_capacity_bytes(&self) -> u64 {
        self.segment_bytes_max - (SEGMENT_HEADER_LENGTH + SLOT_HEADER_LENGTH) as u64
    }

    /// Largest body of records one frame can carry in a segment (room for
    /// the slot, the frame header and an AEAD tag).
    pub fn frame_body_bytes_max(&self) -> u64 {
        self.frame_capacity_bytes() - (FRAME_HEADER_LENGTH + crate::codec::TAG_LENGTH) as u64
    }

    /// Most bytes a plain records body of `record_count` records can have
    /// under these limits (bounds decompression of untrusted frames).
    pub fn plain_body_bytes_max(&self, record_count: u32) -> usize {
        // A frame never holds more than a segment does (atomic batches are
        // checked against it at enqueue), nor more than its records can.
        u64::from(record_count)
            .saturating_mul(self.record_bytes_max)
            .min(self.frame_capacity_bytes()) as usize
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        const SEGMENT_MIN: u64 = 64 * 1024;
        // Index positions are 32-bit.
        const SEGMENT_MAX: u64 = u32::MAX as u64;
        if !(SEGMENT_MIN..=SEGMENT_MAX).contains(&self.segment_bytes_max) {
            return Err(invalid(
                "segment_bytes_max",
                format!(
                    "{} is outside [{SEGMENT_MIN}, {SEGMENT_MAX}]",
                    self.segment_bytes_max
                ),
            ));
        }
        let record_floor = RECORD_OVERHEAD as u64 + 1;
        let record_ceiling = self.frame_body_bytes_max();
        if !(record_floor..=record_ceiling).contains(&self.record_bytes_max) {
            return Err(invalid(
                "record_bytes_max",
                format!(
                    "{} must be between {record_floor} and {record_ceiling} (what one frame in a {}-byte segment holds)",
                    self.record_bytes_max, self.segment_bytes_max
                ),
            ));
        }
        if self.frame_bytes_max < 1024 || self.frame_bytes_max > self.frame_body_bytes_max() {
            return Err(invalid(
                "frame_bytes_max",
                format!(
                    "{} must be between 1024 and what one frame of a {}-byte segment holds ({})",
                    self.frame_bytes_max,
                    self.segment_bytes_max,
                    self.frame_body_bytes_max()
                ),
            ));
        }
        if self.frame_records_max == 0 {
            return Err(invalid(
                "frame_records_max",
                "must be at least 1".to_string(),
            ));
        }
        if self.queue_bytes_max < self.record_bytes_max {
            return Err(invalid(
                "queue_bytes_max",
                format!(
                    "{} is smaller than record_bytes_max {}: a largest record could never be queued",
                    self.queue_bytes_max, self.record_bytes_max
                ),
            ));
        }
        if self.queue_bytes_max > u32::MAX as u64 {
            return Err(invalid(
                "queue_bytes_max",
                format!("{} exceeds 4 GiB", self.queue_bytes_max),
            ));
        }
        if self.unsynced_bytes_max < self.frame_bytes_max {
            return Err(invalid(
                "unsynced_bytes_max",
                format!(
                    "{} is smaller than frame_bytes_max {}",
                    self.unsynced_bytes_max, self.frame_bytes_max
                ),
            ));
        }
        if self.index_interval_bytes == 0 {
            return Err(invalid(
                "index_interval_bytes",
                "must be at least 1".to_string(),
            ));
        }
        if self.checkpoint_interval_bytes == 0 {
            return Err(invalid(
                "checkpoint_interval_bytes",
                "must be at least 1".to_string(),
            ));
        }
        if self.maintenance_interval_ms == 0 {
            return Err(invalid(
                "maintenance_interval_ms",
                "must be at least 1".to_string(),
            ));
        }
        if let Durability::Interval { interval_ms: 0 } = self.durability {
            return Err(invalid(
                "durability",
                "interval must be at least 1 ms".to_string(),
            ));
        }
        if let Compression::Zstd { level } = self.compression {
            if !(1..=19).contains(&level) {
                return Err(invalid(
                    "compression",
                    format!("zstd level {level} is outside 1 to 19"),
                ));
            }
        }
        if let Some(encryption) = self.encryption {
            if encryption.key_id == 0 {
                return Err(invalid(
                    "encryption",
                    "key id 0 means \"no key\"; use 1 or more".to_string(),
                ));
            }
        }
        if self.segment_age_max_ms == Some(0) {
            return Err(invalid(
                "segment_age_max_ms",
                "must be at least 1 ms".to_string(),
            ));
        }
        if self.retention.bytes_max == Some(0) || self.retention.messages_max == Some(0) {
            return Err(invalid(
                "retention",
                "bytes_max and messages_max must be at least 1 when set".to_string(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        StreamConfig::default().validate().unwrap();
        let config = StreamConfig {
            segment_bytes_max: 10,
            ..StreamConfig::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("segment_bytes_max"));
        let config = StreamConfig {
            record_bytes_max: 1 << 40,
            ..StreamConfig::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("record_bytes_max"));
        let config = StreamConfig {
            durability: Durability::Interval { interval_ms: 0 },
            ..StreamConfig::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("durability"));
    }
}
