//! Every multi-step file operation is crash-atomic at every step: the
//! in-memory file system stops the machine at its k-th operation, for every
//! k, and the disk as a power loss would leave it (unsynced pages torn) is
//! opened again. A truncation leaves the old log or the new one; a rotation
//! loses nothing that was synced; a repair interrupted and run again ends
//! where an uninterrupted one does; created directories are durable.

mod common;

use common::*;
use natswal::format::frame::FrameBuilder;
use natswal::io::memory::MemoryFileSystem;
use natswal::io::FileSystem;
use natswal::log::writer::AppendMeta;
use natswal::{
    Log, LogOptions, Record, RecoveryManager, RecoveryMode, SegmentCache, StartPosition,
    StreamConfig, FIRST_OFFSET,
};
use std::path::Path;
use std::sync::Arc;

const DIRECTORY: &str = "/data/streams/s";
const NOW: i64 = 1_700_000_000_000_000_000;

fn options(mode: RecoveryMode) -> LogOptions {
    LogOptions {
        name: "s".to_string(),
        config: small_config(),
        recovery_mode: mode,
        keyring: Arc::default(),
        node_id: 0,
        cache: Arc::new(SegmentCache::new(8)),
        store_locked: None,
        group_sync: None,
    }
}

fn open_at(file_system: &MemoryFileSystem, mode: RecoveryMode) -> natswal::Result<Log> {
    Log::open(
        Arc::new(file_system.clone()),
        Path::new(DIRECTORY),
        options(mode),
    )
    .map(|(log, _)| log)
}

/// Appends `records` in frames of `per_frame` (standalone: no Raft ids).
fn append_frames(log: &Log, records: &[Record], per_frame: usize) {
    let mut builder = FrameBuilder::new();
    for chunk in records.chunks(per_frame) {
        builder.begin();
        for record in chunk {
            builder.push(record, record.timestamp_ns.max(NOW));
        }
        log.append(&mut builder, AppendMeta::default(), NOW)
            .unwrap();
    }
}

/// Offsets and payloads of every record of the log.
fn contents(log: &Log) -> Vec<(u64, bytes::Bytes)> {
    let mut reader = natswal::Reader::new(log.clone(), StartPosition::Earliest, None).unwrap();
    let mut records = Vec::new();
    while let Some(record) = reader.next().unwrap() {
        records.push((record.offset, record.payload));
    }
    records
}

/// A closed log of `count` records in frames of 5, several segments.
fn written(count: u64) -> (MemoryFileSystem, Vec<(u64, bytes::Bytes)>) {
    let file_system = MemoryFileSystem::new();
    let log = open_at(&file_system, RecoveryMode::Strict).unwrap();
    let records: Vec<Record> = (0..count).map(record).collect();
    append_frames(&log, &records, 5);
    log.close().unwrap();
    assert!(
        log.segments().len() >= 3,
        "{} segments",
        log.segments().len()
    );
    let all = contents(&log);
    drop(log);
    (file_system, all)
}

/// Runs `operation` with the machine stopping at its k-th file-system
/// operation, for every k until one run completes; after each crash opens
/// what the disk holds and hands it to `check`.
fn at_every_step(
    base: &MemoryFileSystem,
    mut operation: impl FnMut(&MemoryFileSystem) -> natswal::Result<()>,
    mut check: impl FnMut(u64, bool, &Log),
) -> u64 {
    for step in 1..10_000u64 {
        let trial = base.crash(0);
        trial.crash_after_operations(step);
        let result = operation(&trial);
        let crashed = trial.has_crashed();
        if !crashed {
            result.unwrap_or_else(|error| panic!("step {step}: the operation failed: {error}"));
        }
        for seed in [step, step + 1_000_000] {
            let image = trial.crash(seed);
            let log = open_at(&image, RecoveryMode::Strict)
                .unwrap_or_else(|error| panic!("step {step} seed {seed}: reopen failed: {error}"));
            check(step, crashed, &log);
        }
        if !crashed {
            return step;
        }
    }
    panic!("the operation never completed");
}

#[test]
fn an_offline_truncation_crashed_at_any_step_leaves_the_old_or_the_new_log() {
    let (base, old) = written(1500);
    // Inside a frame of a middle segment: later segments go, the frame is
    // replaced by one with the records before the cut.
    let from_offset = FIRST_OFFSET + 702;
    let new: Vec<_> = old
        .iter()
        .filter(|(offset, _)| *offset < from_offset)
        .cloned()
        .collect();
    let mut outcomes = [0usize; 2];
    let steps = at_every_step(
        &base,
        |trial| {
            let file_system: Arc<dyn FileSystem> = Arc::new(trial.clone());
            RecoveryManager::truncate_suffix(&file_system, Path::new(DIRECTORY), from_offset)
                .map(drop)
        },
        |step, crashed, log| {
            let found = contents(log);
            if found == old {
                assert!(crashed, "step {step}: a finished truncation was undone");
                outcomes[0] += 1;
            } else if found == new {
                assert_eq!(log.written().next_offset, from_offset, "step {step}");
                outcomes[1] += 1;
            } else {
                panic!(
                    "step {step}: neither old ({}) nor new ({}) but {} records",
                    old.len(),
                    new.len(),
                    found.len()
                );
            }
        },
    );
    eprintln!("truncation: {steps} steps, outcomes {outcomes:?}");
    assert!(steps > 10, "the truncation took {steps} steps");
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

#[test]
fn an_online_truncation_crashed_at_any_step_leaves_the_old_or_the_new_log() {
    let (base, old) = written(1500);
    let from_offset = FIRST_OFFSET + 700;
    let new: Vec<_> = old
        .iter()
        .filter(|(offset, _)| *offset < from_offset)
        .cloned()
        .collect();
    let mut outcomes = [0usize; 2];
    at_every_step(
        &base,
        |trial| {
            let log = open_at(trial, RecoveryMode::Strict)?;
            log.truncate_from_offset(from_offset).map(drop)
        },
        |step, _, log| {
            let found = contents(log);
            if found == old {
                outcomes[0] += 1;
            } else if found == new {
                outcomes[1] += 1;
            } else {
                panic!(
                    "step {step}: neither old nor new but {} records",
                    found.len()
                );
            }
        },
    );
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

#[test]
fn a_rotation_crashed_at_any_step_loses_nothing_that_was_synced() {
    let file_system = MemoryFileSystem::new();
    let log = open_at(&file_system, RecoveryMode::Strict).unwrap();
    let records: Vec<Record> = (0..2000).map(record).collect();
    // Fill the active segment until the next frame rotates.
    let mut written_count = 0;
    let segments = log.segments().len();
    while log.segments().len() == segments || log.segments().is_empty() {
        append_frames(&log, &records[written_count..written_count + 5], 5);
        written_count += 5;
        log.sync().unwrap();
    }
    log.truncate_from_offset(FIRST_OFFSET + written_count as u64 - 5)
        .unwrap();
    written_count -= 5;
    log.sync().unwrap();
    drop(log);
    let base = file_system.crash(0);
    let durable = written_count;
    at_every_step(
        &base,
        |trial| {
            let log = open_at(trial, RecoveryMode::Strict)?;
            let mut builder = FrameBuilder::new();
            builder.begin();
            for record in &records[durable..durable + 5] {
                builder.push(record, NOW);
            }
            log.append(&mut builder, AppendMeta::default(), NOW)?;
            log.sync()?;
            log.close()
        },
        |step, crashed, log| {
            let found = contents(log);
            assert!(
                found.len() == durable || found.len() == durable + 5,
                "step {step}: {} records",
                found.len()
            );
            if !crashed {
                assert_eq!(found.len(), durable + 5);
            }
            for (index, (offset, payload)) in found.iter().enumerate() {
                assert_eq!(*offset, FIRST_OFFSET + index as u64);
                assert_eq!(payload, &records[index].payload, "step {step}");
            }
        },
    );
}

#[test]
fn a_repair_crashed_at_any_step_ends_like_an_uninterrupted_one_when_run_again() {
    let (base, all) = written(1500);
    // One flipped bit in the body of a frame of the second segment.
    let damaged_image = base.crash(0);
    let log = open_at(&damaged_image, RecoveryMode::Strict).unwrap();
    let victim = log.segments()[1].path().to_path_buf();
    drop(log);
    let bytes = damaged_image.read(&victim).unwrap();
    let frames = frames_of(&bytes);
    let frame = frames[frames.len() / 2];
    damaged_image
        .flip_bit(&victim, (frame.start + 16 + 100) * 8 + 3)
        .unwrap();
    let damaged_image = damaged_image.crash(0);
    let lost: Vec<u64> =
        (frame.base_offset..frame.base_offset + u64::from(frame.record_count)).collect();
    let expected: Vec<_> = all
        .iter()
        .filter(|(offset, _)| !lost.contains(offset))
        .cloned()
        .collect();
    for step in 1..10_000u64 {
        let trial = damaged_image.crash(0);
        trial.crash_after_operations(step);
        let repaired = open_at(&trial, RecoveryMode::Repair).map(drop);
        let crashed = trial.has_crashed();
        let image = trial.crash(step);
        let log = open_at(&image, RecoveryMode::Repair)
            .unwrap_or_else(|error| panic!("step {step}: the repair, run again, failed: {error}"));
        assert_eq!(contents(&log), expected, "step {step}");
        assert_eq!(log.written().next_offset, FIRST_OFFSET + all.len() as u64);
        if !crashed {
            repaired.unwrap();
            assert!(step > 5, "{step} steps");
            return;
        }
    }
}

#[tokio::test]
async fn created_directories_are_durable() {
    let file_system = MemoryFileSystem::new();
    let directory = Path::new("/fresh/data/streams/s");
    let (stream, _) = natswal::Stream::open(
        Arc::new(file_system.clone()),
        directory,
        "s",
        Arc::new(SegmentCache::new(4)),
        natswal::StreamOptions {
            config: StreamConfig { ..small_config() },
            ..natswal::StreamOptions::default()
        },
    )
    .unwrap();
    let outcome = stream.append(record(0)).await.unwrap();
    assert_eq!(outcome.first_offset, FIRST_OFFSET);
    std::mem::forget(stream);
    let image = file_system.crash(5);
    let (reopened, _) = natswal::Stream::open(
        Arc::new(image),
        directory,
        "s",
        Arc::new(SegmentCache::new(4)),
        natswal::StreamOptions {
            config: small_config(),
            ..natswal::StreamOptions::default()
        },
    )
    .unwrap();
    assert_exactly(&read_all(&reopened).unwrap(), &[record(0)]);
}
