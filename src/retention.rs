//! Retention: removes whole sealed segments, oldest first, while the stream
//! exceeds its age, byte or message limit. The active segment is never
//! removed. Segments are removed by identity, so two passes can never
//! remove one twice or one that is not there; their files are recycled for
//! new segments. A reader in a removed segment goes on from the oldest
//! record still stored; reads of its bytes fail rather than return bytes of
//! the file's next use.

use crate::error::Result;
use crate::log::segment::StorageSegment;
use crate::log::Log;
use crate::metrics::StreamMetrics;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A segment removed by retention (for logs and the audit log).
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
pub(crate) fn enforce(
    log: &Log,
    metrics: &StreamMetrics,
    hook: Option<&crate::stream::RetentionHook>,
    now_ns: i64,
) -> Result<Vec<RetentionDeletion>> {
    let policy = log.config().retention;
    if policy.age_max_ms.is_none() && policy.bytes_max.is_none() && policy.messages_max.is_none() {
        return Ok(Vec::new());
    }
    let segments = log.segments();
    let mut total_bytes: u64 = segments
        .iter()
        .map(|segment| segment.visible_length())
        .sum();
    let mut total_records: u64 = segments.iter().map(|segment| segment.record_count()).sum();
    let mut doomed: Vec<(Arc<StorageSegment>, &'static str)> = Vec::new();
    // Never the last segment, and only sealed, indexed ones.
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
    let identities: Vec<Arc<StorageSegment>> = doomed
        .iter()
        .map(|(segment, _)| Arc::clone(segment))
        .collect();
    let removed = log.remove_segments(&identities)?;
    let mut deletions = Vec::with_capacity(removed.len());
    for segment in removed {
        let reason = doomed
            .iter()
            .find(|(candidate, _)| Arc::ptr_eq(candidate, &segment))
            .map_or("bytes", |(_, reason)| reason);
        let deletion = RetentionDeletion {
            stream: log.name().to_string(),
            segment: segment.path().to_path_buf(),
            base_offset: segment.base_offset(),
            next_offset: segment.next_offset(),
            records: segment.record_count(),
            bytes: segment.visible_length(),
            reason,
        };
        tracing::info!(
            stream = %log.name(),
            segment = %deletion.segment.display(),
            records = deletion.records,
            bytes = deletion.bytes,
            reason,
            "retention removed segment"
        );
        metrics
            .retention_deleted_segments
            .fetch_add(1, Ordering::Relaxed);
        metrics
            .retention_deleted_records
            .fetch_add(deletion.records, Ordering::Relaxed);
        if let Some(hook) = hook {
            hook(&deletion);
        }
        deletions.push(deletion);
    }
    Ok(deletions)
}
