//! The background scrub of a replica: it re-reads every sealed segment of
//! the stream's log at a bounded rate and checks it against the CRC its
//! index recorded when it was sealed, so that damage that happens while the
//! node runs (a flipped bit, a bad sector) is found when it happens, not
//! when a reader or a follower meets it.
//!
//! A damaged segment is logged as an error naming the file and counted
//! (`natswal_raft_scrub_damaged_segments`), then restored while the node
//! runs: the Raft entries its damaged ranges held are fetched from a peer
//! (committed entries are the same bytes on every replica) and the engine
//! rewrites the segment with them (`Log::restore_sealed_segment`, crash-
//! atomic). Only entries this node knows committed are restored; when no
//! peer supplies them, the next pass tries again, and the node's next
//! start repairs them before Raft runs (`group::open_log`). Readers never
//! get the damaged bytes in the meantime: every frame is checked when it
//! is read.

use crate::error::{Error, Result};
use crate::network::Peers;
use natswal::Log;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the scrub waits when the log has no sealed segment yet.
const IDLE_PAUSE: Duration = Duration::from_secs(10);

/// What the scrub found and restored since the group opened.
#[derive(Debug, Default)]
pub struct Scrub {
    segments_checked: AtomicU64,
    damaged: Mutex<BTreeSet<u64>>,
    restored_segments: AtomicU64,
    restored_entries: AtomicU64,
}

/// Scrub counters, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubCounters {
    pub segments_checked: u64,
    /// Distinct sealed segments found damaged.
    pub damaged_segments: u64,
    /// Damaged segments restored from peers while the node ran.
    pub restored_segments: u64,
    /// Raft entries those restores fetched from peers.
    pub restored_entries: u64,
}

/// A sealed segment the scrub restored, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubRestore {
    pub stream: String,
    pub segment: PathBuf,
    pub entries: u64,
}

/// Called after each restore (the bridge audits it).
pub type RestoreHook = Arc<dyn Fn(&ScrubRestore) + Send + Sync>;

/// Where the scrub fetches damaged entries from.
#[derive(Clone)]
pub struct ScrubSource {
    pub peers: Arc<Peers>,
    pub addresses: Vec<String>,
    pub on_restore: Option<RestoreHook>,
}

impl Scrub {
    pub fn counters(&self) -> ScrubCounters {
        ScrubCounters {
            segments_checked: self.segments_checked.load(Ordering::Relaxed),
            damaged_segments: self.damaged.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
            restored_segments: self.restored_segments.load(Ordering::Relaxed),
            restored_entries: self.restored_entries.load(Ordering::Relaxed),
        }
    }

    /// Checks the sealed segments of `log` over and over, pausing after
    /// each as long as reading it takes at `bytes_per_second`, and restores
    /// the damaged ones from `source`. Ends when the task is aborted (the
    /// group stops).
    pub async fn run(self: Arc<Self>, log: Arc<Log>, source: ScrubSource, bytes_per_second: u64) {
        assert!(bytes_per_second > 0, "a scrub of rate 0 is not started");
        loop {
            let segments = log.sealed_segments();
            if segments.is_empty() {
                tokio::time::sleep(IDLE_PAUSE).await;
                continue;
            }
            for segment in segments {
                let checked = Arc::clone(&log);
                let base_offset = segment.base_offset;
                let Ok(result) = blocking(move || checked.verify_sealed_segment(base_offset)).await
                else {
                    return;
                };
                match result {
                    Ok(true) => {
                        self.segments_checked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(error) if !error.is_corruption() => {
                        // Removed under it (a truncation), or unreadable for
                        // now: the next pass reads it again.
                        tracing::warn!(stream = %log.name(), %error, "the scrub could not read a sealed segment");
                    }
                    Err(error) => {
                        self.segments_checked.fetch_add(1, Ordering::Relaxed);
                        self.damaged
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(base_offset);
                        tracing::error!(stream = %log.name(), %error, "the scrub found a damaged sealed segment; readers get an error for its damaged frames until it is restored from peers");
                        self.restore(&log, &source, base_offset).await;
                    }
                }
                let pause = segment.length as f64 / bytes_per_second as f64;
                tokio::time::sleep(Duration::from_secs_f64(pause)).await;
            }
        }
    }

    /// Restores the damaged sealed segment at `base_offset` from peers,
    /// logging the outcome.
    async fn restore(&self, log: &Arc<Log>, source: &ScrubSource, base_offset: u64) {
        match restore_segment(log, source, base_offset).await {
            Ok(Some(restored)) => {
                self.restored_segments.fetch_add(1, Ordering::Relaxed);
                self.restored_entries
                    .fetch_add(restored.entries, Ordering::Relaxed);
                tracing::warn!(stream = %log.name(), segment = %restored.segment.display(), entries = restored.entries, "the scrub restored a damaged sealed segment from peers");
                if let Some(hook) = &source.on_restore {
                    hook(&restored);
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(stream = %log.name(), %error, "the scrub could not restore a damaged sealed segment; it tries again on its next pass, and the node's next start repairs it");
            }
        }
    }
}

/// Fetches the committed entries the damaged ranges of a sealed segment
/// held and has the engine rewrite the segment with them. `Ok(None)`: the
/// segment is gone or intact by now.
async fn restore_segment(
    log: &Arc<Log>,
    source: &ScrubSource,
    base_offset: u64,
) -> Result<Option<ScrubRestore>> {
    let name = log.name().to_string();
    let found = Arc::clone(log);
    let damaged = blocking(move || found.sealed_segment_damage(base_offset))
        .await?
        .map_err(|error| Error::engine(&name, error))?;
    let Some(damaged) = damaged else {
        return Ok(None);
    };
    let committed = log.metadata().committed.map_or(0, |id| id.index);
    let mut frames = Vec::with_capacity(damaged.ranges.len());
    for range in &damaged.ranges {
        if range.raft_indexes.end > committed + 1 {
            return Err(Error::Invalid(format!(
                "stream '{name}': {} holds damaged Raft entries [{}, {}) past the commit index this node knows ({committed}); they are restored once committed",
                damaged.path.display(),
                range.raft_indexes.start,
                range.raft_indexes.end
            )));
        }
        frames.push(
            crate::group::fetch_committed(
                &source.peers,
                &source.addresses,
                &name,
                range.raft_indexes.clone(),
            )
            .await?,
        );
    }
    let entries = frames.iter().map(Vec::len).sum::<usize>() as u64;
    let restored = Arc::clone(log);
    let segment = damaged.path.clone();
    blocking(move || restored.restore_sealed_segment(&damaged, &frames))
        .await?
        .map_err(|error| Error::engine(&name, error))?;
    Ok(Some(ScrubRestore {
        stream: name,
        segment,
        entries,
    }))
}

/// Runs blocking engine work off the runtime's worker threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| Error::Invalid(format!("a scrub task stopped: {error}")))
}
