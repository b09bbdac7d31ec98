//! Reads by Raft index while a leader appends: every read of entries the
//! log holds returns exactly those entries (Raft's replication and apply
//! read the log this way, concurrently with the writer).

mod common;

use common::*;
use natswal::format::frame::FrameBuilder;
use natswal::io::os::OsFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::log::writer::AppendMeta;
use natswal::log::FrameRange;
use natswal::{Keyring, Log, LogOptions, RecoveryMode, SegmentCache, StreamConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn reads_by_raft_index_during_appends_return_exactly_the_entries_asked() {
    let directory = tempfile::tempdir().unwrap();
    let file_system: Arc<dyn FileSystem> = Arc::new(OsFileSystem::new(WriteMode::Pwrite));
    let options = LogOptions {
        name: "reads".to_string(),
        // Small segments: reads cross rotations and new active segments.
        config: StreamConfig {
            segment_bytes_max: 1024 * 1024,
            record_bytes_max: 64 * 1024,
            frame_bytes_max: 256 * 1024,
            ..StreamConfig::default()
        },
        recovery_mode: RecoveryMode::Strict,
        keyring: Arc::new(Keyring::default()),
        node_id: 1,
        cache: Arc::new(SegmentCache::new(8)),
        store_locked: None,
        group_sync: None,
    };
    let log = Arc::new(Log::open(file_system, directory.path(), options).unwrap().0);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let log = Arc::clone(&log);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut reads = 0u64;
            let mut seed = 7u64;
            while !done.load(Ordering::Acquire) {
                let last = log.written().last_log_id.index;
                if last < 2 {
                    continue;
                }
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let start = 1 + (seed >> 33) % last;
                let end = (start + 1 + (seed >> 20) % 64).min(last + 1);
                let frames = log
                    .read_frames(FrameRange::RaftIndex { start, end })
                    .unwrap_or_else(|error| panic!("reading [{start}, {end}) of {last}: {error}"));
                assert_eq!(frames.len() as u64, end - start);
                for (frame, index) in frames.iter().zip(start..) {
                    assert_eq!(frame.header.raft_index, index);
                }
                reads += 1;
            }
            reads
        })
    };
    let mut builder = FrameBuilder::new();
    for index in 1..=20_000u64 {
        builder.begin();
        for number in 0..16 {
            builder.push(&record(index * 16 + number), 1_700_000_000_000_000_000);
        }
        let meta = AppendMeta {
            atomic: false,
            raft_term: 1,
            raft_index: index,
        };
        log.append(&mut builder, meta, 1_700_000_000_000_000_000)
            .unwrap();
        if index % 64 == 0 {
            log.sync().unwrap();
        }
    }
    done.store(true, Ordering::Release);
    let reads = reader.join().unwrap();
    assert!(reads > 100, "{reads} reads");
}
