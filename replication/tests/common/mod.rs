//! Shared by the replication tests: how a test opens a stream's log.

use natswal::{Keyring, LogOptions, RecoveryMode, SegmentCache, StreamConfig};
use std::sync::Arc;

/// Strict recovery, no encryption, node 1's nonces, a small cache.
pub fn log_options(name: &str, config: StreamConfig) -> LogOptions {
    LogOptions {
        name: name.to_string(),
        config,
        recovery_mode: RecoveryMode::Strict,
        keyring: Arc::new(Keyring::default()),
        node_id: 1,
        cache: Arc::new(SegmentCache::new(8)),
        store_locked: None,
        group_sync: None,
    }
}
