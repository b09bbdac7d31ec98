//! Engine counters and histograms, lock-free, read by the bridge's
//! `/metrics` endpoint and by benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (microseconds) of the sync latency histogram buckets.
pub const SYNC_LATENCY_BOUNDS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];
/// Upper bounds (microseconds) of the append-to-durable latency buckets.
pub const APPEND_LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 25_000, 50_000, 100_000,
    250_000, 1_000_000,
];
/// Upper bounds of the records-per-frame histogram buckets.
pub const FRAME_RECORDS_BOUNDS: [u64; 10] = [1, 2, 4, 16, 64, 256, 1024, 4096, 16384, 65536];

/// A fixed-bucket histogram (cumulative on export).
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: &'static [u64; N],
    buckets: [AtomicU64; N],
    overflow: AtomicU64,
    sum: AtomicU64,
    count: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    pub const fn new(bounds: &'static [u64; N]) -> Histogram<N> {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; N],
            overflow: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        match self.bounds.iter().position(|bound| value <= *bound) {
            Some(index) => self.buckets[index].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// `(upper bound, cumulative count)` pairs, then sum and count.
    pub fn snapshot(&self) -> (Vec<(u64, u64)>, u64, u64) {
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(bound, bucket)| {
                cumulative += bucket.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
            .collect();
        (
            buckets,
            self.sum.load(Ordering::Relaxed),
            self.count.load(Ordering::Relaxed),
        )
    }
}

/// Per-stream engine metrics.
#[derive(Debug)]
pub struct StreamMetrics {
    pub frames: AtomicU64,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_latency_us: Histogram<12>,
    pub frame_records: Histogram<10>,
    /// From queueing an append to completing it at its durability level.
    pub append_latency_us: Histogram<16>,
    pub retention_deleted_segments: AtomicU64,
    pub retention_deleted_records: AtomicU64,
}

impl Default for StreamMetrics {
    fn default() -> Self {
        StreamMetrics {
            frames: AtomicU64::new(0),
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            sync_latency_us: Histogram::new(&SYNC_LATENCY_BOUNDS_US),
            frame_records: Histogram::new(&FRAME_RECORDS_BOUNDS),
            append_latency_us: Histogram::new(&APPEND_LATENCY_BOUNDS_US),
            retention_deleted_segments: AtomicU64::new(0),
            retention_deleted_records: AtomicU64::new(0),
        }
    }
}

impl StreamMetrics {
    pub(crate) fn record_frame(&self, records: u32, bytes: u64) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.records
            .fetch_add(u64::from(records), Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.frame_records.observe(u64::from(records));
    }

    pub(crate) fn record_append_latency(&self, elapsed: Duration) {
        self.append_latency_us.observe(elapsed.as_micros() as u64);
    }

    pub(crate) fn record_sync(&self, elapsed: Duration) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_latency_us.observe(elapsed.as_micros() as u64);
    }
}
