//! The background scrub of a replica: it re-reads every sealed segment of
//! the stream's log at a bounded rate and checks it against the CRC its
//! index recorded when it was sealed, so that damage that happens while the
//! node runs (a flipped bit, a bad sector) is reported when it happens, not
//! when a reader or a follower meets it.
//!
//! It owns no file and changes nothing: a damaged segment is logged once as
//! an error naming the file and counted (`natswal_raft_scrub_damaged_segments`);
//! the node's next start validates the log and writes the damaged committed
//! entries back from peers (`group::open_log`). Readers never get the
//! damaged bytes in the meantime: every frame is checked when it is read.

use natswal::Log;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the scrub waits when the log has no sealed segment yet.
const IDLE_PAUSE: Duration = Duration::from_secs(10);

/// What the scrub found since the group opened.
#[derive(Debug, Default)]
pub struct Scrub {
    segments_checked: AtomicU64,
    damaged: Mutex<BTreeSet<u64>>,
}

/// Scrub counters, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubCounters {
    pub segments_checked: u64,
    /// Distinct sealed segments found damaged.
    pub damaged_segments: u64,
}

impl Scrub {
    pub fn counters(&self) -> ScrubCounters {
        ScrubCounters {
            segments_checked: self.segments_checked.load(Ordering::Relaxed),
            damaged_segments: self.damaged.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
        }
    }

    /// Checks the sealed segments of `log` over and over, pausing after
    /// each as long as reading it takes at `bytes_per_second`. Ends when
    /// the task is aborted (the group stops).
    pub async fn run(self: Arc<Self>, log: Arc<Log>, bytes_per_second: u64) {
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
                let result =
                    tokio::task::spawn_blocking(move || checked.verify_sealed_segment(base_offset))
                        .await;
                match result {
                    Ok(Ok(true)) => {
                        self.segments_checked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(error)) if !error.is_corruption() => {
                        // Removed under it (a truncation), or unreadable for
                        // now: the next pass reads it again.
                        tracing::warn!(stream = %log.name(), %error, "the scrub could not read a sealed segment");
                    }
                    Ok(Err(error)) => {
                        self.segments_checked.fetch_add(1, Ordering::Relaxed);
                        let first = self
                            .damaged
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(base_offset);
                        if first {
                            tracing::error!(stream = %log.name(), %error, "the scrub found a damaged sealed segment; readers get an error for its damaged frames, and the next start writes them back from peers");
                        }
                    }
                    Err(_) => return,
                }
                let pause = segment.length as f64 / bytes_per_second as f64;
                tokio::time::sleep(Duration::from_secs_f64(pause)).await;
            }
        }
    }
}
