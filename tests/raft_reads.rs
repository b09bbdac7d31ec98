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
use natswal::{Log, StreamConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn reads_by_raft_index_during_appends_return_exactly_the_entries_asked() {
    let directory = tempfile::tempdir().unwrap();
    let file_system: Arc<dyn FileSystem> = Arc::new(OsFileSystem::new(WriteMode::Pwrite));
    // Small segments: reads cross rotations and new active segments.
    let config = StreamConfig {
        segment_bytes_max: 1024 * 1024,
        record_bytes_max: 64 * 1024,
        frame_bytes_max: 256 * 1024,
        ..StreamConfig::default()
    };
    let options = log_options("reads", config);
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

/// A reader with a ceiling (a replicated stream's applied end) never hands
/// out a record at or past it, and `wait` wakes when the ceiling moves.
#[test]
fn a_reader_with_a_ceiling_stops_before_uncommitted_frames() {
    let directory = tempfile::tempdir().unwrap();
    let file_system: Arc<dyn FileSystem> = Arc::new(OsFileSystem::new(WriteMode::Pwrite));
    let options = log_options("ceiling", StreamConfig::default());
    let log = Log::open(file_system, directory.path(), options).unwrap().0;
    let mut builder = FrameBuilder::new();
    // Three frames of four records each, all durable.
    for index in 1..=3u64 {
        builder.begin();
        for number in 0..4 {
            builder.push(&record(index * 4 + number), 1_700_000_000_000_000_000);
        }
        let meta = AppendMeta {
            atomic: false,
            raft_term: 1,
            raft_index: index,
        };
        log.append(&mut builder, meta, 1_700_000_000_000_000_000)
            .unwrap();
    }
    log.sync().unwrap();
    let first = log.segments()[0].base_offset();
    let (ceiling, watched) = tokio::sync::watch::channel(first + 4);
    let mut reader = natswal::Reader::new(log.clone(), natswal::StartPosition::Earliest, None)
        .unwrap()
        .with_ceiling(watched);
    let offsets = |reader: &mut natswal::Reader| {
        std::iter::from_fn(|| reader.next().unwrap().map(|record| record.offset))
            .collect::<Vec<_>>()
    };
    assert_eq!(offsets(&mut reader), (first..first + 4).collect::<Vec<_>>());
    // A ceiling inside a frame keeps the whole frame back.
    ceiling.send(first + 6).unwrap();
    assert_eq!(offsets(&mut reader), Vec::<u64>::new());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let woken = runtime.block_on(async {
        let waiting = reader.wait();
        ceiling.send(first + 12).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await
    });
    assert!(
        matches!(woken, Ok(Ok(()))),
        "wait wakes when the ceiling moves"
    );
    assert_eq!(
        offsets(&mut reader),
        (first + 4..first + 12).collect::<Vec<_>>()
    );
    drop(reader);
    log.close().unwrap();
}
