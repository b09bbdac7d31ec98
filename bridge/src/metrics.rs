//! The bridge's counters and the Prometheus text rendering of them and of
//! the engine's per-stream metrics.

use natswal::Stream;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters of one stream's ingest.
#[derive(Debug, Default)]
pub struct StreamCounters {
    pub ingest_messages: AtomicU64,
    pub ingest_bytes: AtomicU64,
    pub acks: AtomicU64,
    pub duplicates: AtomicU64,
    /// Replies (acks, errors) dropped because a shutdown gave up on NATS.
    pub replies_undelivered: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl StreamCounters {
    pub fn error(&self, kind: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(kind)
            .or_insert(0) += 1;
    }
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct BridgeMetrics {
    pub slow_consumer_events: AtomicU64,
    pub nats_disconnects: AtomicU64,
    /// Whether each NATS connection (by role: ingest, api) is up; one
    /// entry per connection, so one that is down is never hidden by another.
    nats_connections: Mutex<BTreeMap<String, bool>>,
    pub replay_requests: AtomicU64,
    pub replay_messages: AtomicU64,
    pub replay_errors: AtomicU64,
    streams: Mutex<Vec<(Arc<Stream>, Arc<StreamCounters>)>>,
    /// The store's group sync, if it has one (its totals are exported).
    pub group_sync: std::sync::OnceLock<Arc<natswal::log::group_sync::GroupSync>>,
    /// This node's replicated streams (with a `[cluster]`); weak, so
    /// shutdown can close them while metrics live on.
    pub raft_groups: std::sync::OnceLock<crate::cluster::WeakGroups>,
}

impl BridgeMetrics {
    pub fn register(&self, stream: Arc<Stream>) -> Arc<StreamCounters> {
        let counters = Arc::new(StreamCounters::default());
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((stream, Arc::clone(&counters)));
        counters
    }

    /// Records whether the connection of `role` is up.
    pub fn set_nats_connection(&self, role: &str, up: bool) {
        self.nats_connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(role.to_string(), up);
    }

    fn nats_connections_up(&self) -> usize {
        self.nats_connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .filter(|up| **up)
            .count()
    }

    /// The roles of NATS connections that are down.
    pub fn nats_connections_down(&self) -> Vec<String> {
        self.nats_connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|(_, up)| !**up)
            .map(|(role, _)| role.clone())
            .collect()
    }

    /// Replies every stream dropped because a shutdown gave up on NATS.
    pub fn replies_undelivered(&self) -> u64 {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(_, counters)| counters.replies_undelivered.load(Ordering::Relaxed))
            .sum()
    }

    /// One line per stream: received, acknowledged, duplicates, errors.
    pub fn summary(&self) -> Vec<String> {
        let streams = self
            .streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        streams
            .iter()
            .map(|(stream, counters)| {
                format!(
                    "stream {}: received {}, acknowledged {}, duplicates {}, errors {:?}",
                    stream.name(),
                    counters.ingest_messages.load(Ordering::Relaxed),
                    counters.acks.load(Ordering::Relaxed),
                    counters.duplicates.load(Ordering::Relaxed),
                    counters
                        .errors
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                )
            })
            .collect()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let streams = self
            .streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let counter = |out: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        counter(
            &mut out,
            "natswal_ingest_messages_total",
            "Messages received from NATS for storage.",
            "counter",
        );
        for (stream, counters) in &streams {
            let _ = writeln!(
                out,
                "natswal_ingest_messages_total{{stream=\"{}\"}} {}",
                stream.name(),
                counters.ingest_messages.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut out,
            "natswal_ingest_bytes_total",
            "Payload bytes received from NATS for storage.",
            "counter",
        );
        for (stream, counters) in &streams {
            let _ = writeln!(
                out,
                "natswal_ingest_bytes_total{{stream=\"{}\"}} {}",
                stream.name(),
                counters.ingest_bytes.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut out,
            "natswal_acks_total",
            "Publish acknowledgements sent after durability.",
            "counter",
        );
        for (stream, counters) in &streams {
            let _ = writeln!(
                out,
                "natswal_acks_total{{stream=\"{}\"}} {}",
                stream.name(),
                counters.acks.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut out,
            "natswal_replies_undelivered_total",
            "Acks and error replies dropped because a shutdown gave up on NATS (publishers retry).",
            "counter",
        );
        for (stream, counters) in &streams {
            let _ = writeln!(
                out,
                "natswal_replies_undelivered_total{{stream=\"{}\"}} {}",
                stream.name(),
                counters.replies_undelivered.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut out,
            "natswal_duplicates_total",
            "Messages not stored because their Nats-Msg-Id was in the duplicate window.",
            "counter",
        );
        for (stream, counters) in &streams {
            let _ = writeln!(
                out,
                "natswal_duplicates_total{{stream=\"{}\"}} {}",
                stream.name(),
                counters.duplicates.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut out,
            "natswal_errors_total",
            "Messages that could not be stored, by kind.",
            "counter",
        );
        for (stream, counters) in &streams {
            for (kind, count) in counters
                .errors
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
            {
                let _ = writeln!(
                    out,
                    "natswal_errors_total{{stream=\"{}\",kind=\"{kind}\"}} {count}",
                    stream.name()
                );
            }
        }
        counter(
            &mut out,
            "natswal_stored_records_total",
            "Records written to the log.",
            "counter",
        );
        for (stream, _) in &streams {
            let _ = writeln!(
                out,
                "natswal_stored_records_total{{stream=\"{}\"}} {}",
                stream.name(),
                stream.metrics().records.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut out,
            "natswal_syncs_total",
            "Group-commit syncs.",
            "counter",
        );
        for (stream, _) in &streams {
            let _ = writeln!(
                out,
                "natswal_syncs_total{{stream=\"{}\"}} {}",
                stream.name(),
                stream.metrics().syncs.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut out,
            "natswal_stream_next_offset",
            "Offset the next stored record gets.",
            "gauge",
        );
        for (stream, _) in &streams {
            let _ = writeln!(
                out,
                "natswal_stream_next_offset{{stream=\"{}\"}} {}",
                stream.name(),
                stream.status().next_offset
            );
        }
        counter(
            &mut out,
            "natswal_stream_bytes",
            "Bytes stored in the stream's segments.",
            "gauge",
        );
        for (stream, _) in &streams {
            let _ = writeln!(
                out,
                "natswal_stream_bytes{{stream=\"{}\"}} {}",
                stream.name(),
                stream.status().bytes
            );
        }
        counter(
            &mut out,
            "natswal_stream_poisoned",
            "1 when a failed sync made the stream read-only.",
            "gauge",
        );
        for (stream, _) in &streams {
            let _ = writeln!(
                out,
                "natswal_stream_poisoned{{stream=\"{}\"}} {}",
                stream.name(),
                u8::from(stream.status().poisoned.is_some())
            );
        }
        counter(
            &mut out,
            "natswal_retention_deleted_segments_total",
            "Segments deleted by retention.",
            "counter",
        );
        for (stream, _) in &streams {
            let _ = writeln!(
                out,
                "natswal_retention_deleted_segments_total{{stream=\"{}\"}} {}",
                stream.name(),
                stream
                    .metrics()
                    .retention_deleted_segments
                    .load(Ordering::Relaxed)
            );
        }
        for (name, help, recycled) in [
            (
                "natswal_segment_files_created_total",
                "Segment files created new (allocating extents).",
                false,
            ),
            (
                "natswal_segment_files_recycled_total",
                "Segment files reused from recycle/ (no new extents, no discard).",
                true,
            ),
        ] {
            counter(&mut out, name, help, "counter");
            for (stream, _) in &streams {
                let (created, reused) = stream.log().segment_file_counts();
                let value = if recycled { reused } else { created };
                let _ = writeln!(out, "{name}{{stream=\"{}\"}} {value}", stream.name());
            }
        }
        counter(
            &mut out,
            "natswal_sync_latency_seconds",
            "Duration of group-commit syncs.",
            "histogram",
        );
        for (stream, _) in &streams {
            let (buckets, sum, count) = stream.metrics().sync_latency_us.snapshot();
            histogram(
                &mut out,
                "natswal_sync_latency_seconds",
                stream.name(),
                &buckets,
                sum,
                count,
                1e-6,
            );
        }
        counter(
            &mut out,
            "natswal_append_latency_seconds",
            "From queueing an append to its durability.",
            "histogram",
        );
        for (stream, _) in &streams {
            let (buckets, sum, count) = stream.metrics().append_latency_us.snapshot();
            histogram(
                &mut out,
                "natswal_append_latency_seconds",
                stream.name(),
                &buckets,
                sum,
                count,
                1e-6,
            );
        }
        counter(
            &mut out,
            "natswal_batch_records",
            "Records per written batch frame.",
            "histogram",
        );
        for (stream, _) in &streams {
            let (buckets, sum, count) = stream.metrics().frame_records.snapshot();
            histogram(
                &mut out,
                "natswal_batch_records",
                stream.name(),
                &buckets,
                sum,
                count,
                1.0,
            );
        }
        let global = [
            (
                "natswal_slow_consumer_events_total",
                "Times NATS dropped messages because natswal consumed too slowly.",
                "counter",
                self.slow_consumer_events.load(Ordering::Relaxed) as i64,
            ),
            (
                "natswal_nats_disconnects_total",
                "Disconnections from NATS.",
                "counter",
                self.nats_disconnects.load(Ordering::Relaxed) as i64,
            ),
            (
                "natswal_nats_connections",
                "Open NATS connections.",
                "gauge",
                self.nats_connections_up() as i64,
            ),
            (
                "natswal_replay_requests_total",
                "Replay requests served.",
                "counter",
                self.replay_requests.load(Ordering::Relaxed) as i64,
            ),
            (
                "natswal_replay_messages_total",
                "Records sent by replay.",
                "counter",
                self.replay_messages.load(Ordering::Relaxed) as i64,
            ),
            (
                "natswal_replay_errors_total",
                "Replay requests answered with an error.",
                "counter",
                self.replay_errors.load(Ordering::Relaxed) as i64,
            ),
        ];
        let (group_syncs, group_requests) =
            self.group_sync.get().map_or((0, 0), |group| group.totals());
        let global = global.into_iter().chain([
            (
                "natswal_group_syncs_total",
                "Syncs run by the store's group sync (syncfs, or one file's own sync for a group of one).",
                "counter",
                group_syncs as i64,
            ),
            (
                "natswal_group_sync_requests_total",
                "Stream syncs those group syncs covered (requests / syncs = the mean group size).",
                "counter",
                group_requests as i64,
            ),
        ]);
        for (name, help, kind, value) in global {
            counter(&mut out, name, help, kind);
            let _ = writeln!(out, "{name} {value}");
        }
        if let Some(groups) = self.raft_groups.get().and_then(std::sync::Weak::upgrade) {
            render_raft(&mut out, &groups);
        }
        out
    }
}

/// Each replicated stream's Raft state on this node, and on its leader
/// each replica's lag.
fn render_raft(out: &mut String, groups: &crate::cluster::Groups) {
    let statuses: Vec<_> = groups.values().map(|group| group.status()).collect();
    type Field = fn(&natswal_replication::GroupStatus) -> u64;
    let series: [(&str, &str, &str, Field); 15] = [
        (
            "natswal_raft_term",
            "gauge",
            "The stream's Raft term as this node sees it.",
            |status| status.term,
        ),
        (
            "natswal_raft_is_leader",
            "gauge",
            "1 if this node leads the stream's group.",
            |status| u64::from(status.is_leader),
        ),
        (
            "natswal_raft_last_index",
            "gauge",
            "Index of the last entry in this node's log (entries counted from 1).",
            |status| status.last_index.map_or(0, |index| index + 1),
        ),
        (
            "natswal_raft_commit_index",
            "gauge",
            "Index of the last entry this node knows committed (counted from 1).",
            |status| status.committed.map_or(0, |index| index + 1),
        ),
        (
            "natswal_raft_applied_index",
            "gauge",
            "Index of the last entry applied here: replays read up to it (counted from 1).",
            |status| status.applied.map_or(0, |index| index + 1),
        ),
        (
            "natswal_raft_elections_total",
            "counter",
            "Raft terms this node saw begin since it started (each begins with an election, won or not).",
            |status| status.elections,
        ),
        (
            "natswal_raft_leader_changes_total",
            "counter",
            "Times the stream's leader, as this node knows it, moved to another node.",
            |status| status.leader_changes,
        ),
        (
            "natswal_raft_repaired_entries_total",
            "counter",
            "Committed entries this node had lost or damaged and fetched from peers when it opened the stream.",
            |status| status.repaired_entries,
        ),
        (
            "natswal_raft_snapshots_installed_total",
            "counter",
            "Snapshots this node installed as a follower by receiving the leader's segments.",
            |status| status.shipping.snapshots_installed,
        ),
        (
            "natswal_raft_segments_received_total",
            "counter",
            "Sealed segment files this node received from a leader (segment shipping).",
            |status| status.shipping.segments_received,
        ),
        (
            "natswal_raft_segment_bytes_received_total",
            "counter",
            "Bytes of sealed segment files this node received from a leader.",
            |status| status.shipping.bytes_received,
        ),
        (
            "natswal_raft_snapshot_transfers_failed_total",
            "counter",
            "Segment downloads for a snapshot that failed on this node (each is retried).",
            |status| status.shipping.transfers_failed,
        ),
        (
            "natswal_raft_scrub_segments_checked_total",
            "counter",
            "Sealed segments the background scrub re-read and checked against their CRC.",
            |status| status.scrub.segments_checked,
        ),
        (
            "natswal_raft_scrub_damaged_segments",
            "gauge",
            "Sealed segments the scrub found damaged since the node started (each is then restored from peers).",
            |status| status.scrub.damaged_segments,
        ),
        (
            "natswal_raft_scrub_restored_segments_total",
            "counter",
            "Damaged sealed segments the scrub restored from peers while the node ran.",
            |status| status.scrub.restored_segments,
        ),
    ];
    for (name, kind, help, field) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for status in &statuses {
            let _ = writeln!(
                out,
                "{name}{{stream=\"{}\"}} {}",
                status.stream,
                field(status)
            );
        }
    }
    let name = "natswal_raft_replica_lag_entries";
    let _ = writeln!(out, "# HELP {name} Entries a replica lacks behind the leader (reported by the leader).\n# TYPE {name} gauge");
    for status in &statuses {
        for replica in &status.replicas {
            let _ = writeln!(
                out,
                "{name}{{stream=\"{}\",replica=\"{}\"}} {}",
                status.stream, replica.node_id, replica.lag_entries
            );
        }
    }
}

fn histogram(
    out: &mut String,
    name: &str,
    stream: &str,
    buckets: &[(u64, u64)],
    sum: u64,
    count: u64,
    scale: f64,
) {
    for (bound, cumulative) in buckets {
        let _ = writeln!(
            out,
            "{name}_bucket{{stream=\"{stream}\",le=\"{}\"}} {cumulative}",
            *bound as f64 * scale
        );
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{stream=\"{stream}\",le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "{name}_sum{{stream=\"{stream}\"}} {}",
        sum as f64 * scale
    );
    let _ = writeln!(out, "{name}_count{{stream=\"{stream}\"}} {count}");
}

/// Lets a repeated warning through at most once per interval (the event is
/// counted in a metric every time; the log only says it keeps happening).
pub struct Spacing {
    interval_ms: u64,
    /// Milliseconds since the first check in this process.
    next_ms: AtomicU64,
}

impl Spacing {
    pub const fn every_ms(interval_ms: u64) -> Spacing {
        Spacing {
            interval_ms,
            next_ms: AtomicU64::new(0),
        }
    }

    /// True for the first call of each interval.
    pub fn due(&self) -> bool {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now_ms = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64;
        let next_ms = self.next_ms.load(Ordering::Relaxed);
        now_ms >= next_ms
            && self
                .next_ms
                .compare_exchange(
                    next_ms,
                    now_ms + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

#[cfg(test)]
mod spacing_tests {
    use super::Spacing;

    #[test]
    fn a_spaced_warning_passes_once_per_interval() {
        let spacing = Spacing::every_ms(60_000);
        assert!(spacing.due());
        assert!(!spacing.due(), "the second call within the interval");
        let always = Spacing::every_ms(0);
        assert!(always.due() && always.due());
    }
}
