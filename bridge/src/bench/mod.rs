//! Benchmark programs (`natswal bench ...`). Figures are reported beside a
//! peer measured in the same run, since the machine is shared and noisy.

pub mod cluster;
mod codec;
pub mod nats;
pub mod raft;
pub mod streams;
pub mod wal;

/// Latency percentiles from a list of nanosecond samples.
pub fn percentiles_us(samples: &mut [u64], quantiles: &[f64]) -> Vec<f64> {
    samples.sort_unstable();
    quantiles
        .iter()
        .map(|quantile| {
            if samples.is_empty() {
                return 0.0;
            }
            let index = ((samples.len() as f64 - 1.0) * quantile).round() as usize;
            samples[index] as f64 / 1000.0
        })
        .collect()
}

/// Anonymous resident memory of this process in KiB (Linux).
pub fn rss_anon_kib() -> u64 {
    status_value(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
        "RssAnon:",
    )
}

/// The number after `field` in a `/proc/<pid>/status` text (0 if absent).
pub fn status_value(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}
