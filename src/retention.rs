//! Retention: deletes whole sealed segments, oldest first, while the stream
//! exceeds its age, byte or message limit. The active segment is never
//! deleted. Readers that still hold a deleted segment keep reading it: its
//! map stays valid after the unlink until they let go. A reader positioned
//! in a deleted segment it had not mapped yet continues from the oldest
//! record still stored.

use crate::error::Result;
use crate::segment::storage::StorageSegment;
use crate::stream::StreamShared;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A segment deleted by retention (for logs and the audit log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionDeletion {
    pub stream: String,
    pub segment: PathBuf,
    pub base_offset: u64,
    pub next_offset: u64,
    pub records: u64,
    pub bytes: u64,
    /// Which limit: `age`, `bytes` or `messages`.
    pub reason: &'static str,
}

/// Applies the stream's retention policy now.
pub(crate) fn enforce(shared: &StreamShared, now_ns: i64) -> Result<Vec<RetentionDeletion>> {
    let policy = shared.config.retention;
    if policy.age_max_ms.is_none() && policy.bytes_max.is_none() && policy.messages_max.is_none() {
        return Ok(Vec::new());
    }
    let segments = shared.segments_snapshot();
    let mut total_bytes: u64 = segments
        .iter()
        .map(|segment| segment.visible_length())
        .sum();
    let mut total_records: u64 = segments.iter().map(|segment| segment.record_count()).sum();
    let mut doomed: Vec<(Arc<StorageSegment>, &'static str)> = Vec::new();
    // Never the last segment, and only sealed ones.
    for segment in segments.iter().take(segments.len().saturating_sub(1)) {
        if !segment.is_indexed() {
            break;
        }
        let too_old = policy.age_max_ms.is_some_and(|age_max_ms| {
            let newest = segment.progress().last_timestamp_ns;
            newest < now_ns.saturating_sub((age_max_ms as i64).saturating_mul(1_000_000))
        });
        let too_big = policy
            .bytes_max
            .is_some_and(|bytes_max| total_bytes > bytes_max);
        let too_many = policy
            .messages_max
            .is_some_and(|messages_max| total_records > messages_max);
        let reason = if too_old {
            "age"
        } else if too_big {
            "bytes"
        } else if too_many {
            "messages"
        } else {
            break;
        };
        total_bytes -= segment.visible_length();
        total_records -= segment.record_count();
        doomed.push((Arc::clone(segment), reason));
    }
    if doomed.is_empty() {
        return Ok(Vec::new());
    }
    shared.remove_segments(doomed.len());
    let mut deletions = Vec::with_capacity(doomed.len());
    for (segment, reason) in doomed {
        shared.file_system.remove(segment.path())?;
        if shared.file_system.exists(segment.index_path()) {
            shared.file_system.remove(segment.index_path())?;
        }
        let deletion = RetentionDeletion {
            stream: shared.name.clone(),
            segment: segment.path().to_path_buf(),
            base_offset: segment.base_offset(),
            next_offset: segment.next_offset(),
            records: segment.record_count(),
            bytes: segment.visible_length(),
            reason,
        };
        tracing::info!(
            stream = %shared.name,
            segment = %deletion.segment.display(),
            records = deletion.records,
            bytes = deletion.bytes,
            reason,
            "retention deleted segment"
        );
        shared
            .metrics
            .retention_deleted_segments
            .fetch_add(1, Ordering::Relaxed);
        shared
            .metrics
            .retention_deleted_records
            .fetch_add(deletion.records, Ordering::Relaxed);
        if let Some(hook) = &shared.hooks.on_retention {
            hook(&deletion);
        }
        deletions.push(deletion);
    }
    shared.file_system.sync_directory(&shared.directory)?;
    Ok(deletions)
}
