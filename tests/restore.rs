//! Lost Raft entries written back into a repaired log: a repair cuts only
//! the damaged frame out (the Raft entries after it continue the log), the
//! hole is found with the Raft indexes around it, the very frames a peer
//! holds close it byte for byte, anything else offered is refused, and a
//! restore crashed at any step ends, run again, like an uninterrupted one.
//! A sealed segment damaged while the log runs is restored the same way,
//! online: readers in it go on, and a crash at any step leaves the damaged
//! segment (found again) or the restored one.

mod common;

use bytes::Bytes;
use common::*;
use natswal::format::frame::{FrameBuilder, FrameKind};
use natswal::io::memory::MemoryFileSystem;
use natswal::io::FileSystem;
use natswal::log::restore::{restore_raft_frames, DamagedSegment, RaftHole};
use natswal::log::writer::AppendMeta;
use natswal::log::FrameRange;
use natswal::{Log, Record, RecoveryMode};
use std::path::Path;
use std::sync::Arc;

const DIRECTORY: &str = "/data/streams/r";
const NOW: i64 = 1_700_000_000_000_000_000;
/// Raft entries written: records, with a blank entry every tenth.
const ENTRIES: u64 = 400;

fn open_at(file_system: &MemoryFileSystem, mode: RecoveryMode) -> natswal::Result<Log> {
    let mut options = log_options("r", small_config());
    options.recovery_mode = mode;
    Log::open(Arc::new(file_system.clone()), Path::new(DIRECTORY), options).map(|(log, _)| log)
}

/// A closed Raft log of `ENTRIES` entries over several segments, and its
/// frames (what a peer holds), and the Raft index the second segment
/// begins with.
fn written() -> (MemoryFileSystem, Vec<Bytes>, u64) {
    let file_system = MemoryFileSystem::new();
    let log = open_at(&file_system, RecoveryMode::Strict).unwrap();
    let mut builder = FrameBuilder::new();
    for index in 1..=ENTRIES {
        if index % 10 == 0 {
            log.append_raft_entry(FrameKind::Blank, 1, index, &[], NOW)
                .unwrap();
            continue;
        }
        builder.begin();
        for number in 0..3 {
            let record: Record = record(index * 3 + number);
            builder.push(&record, NOW);
        }
        let meta = AppendMeta {
            atomic: false,
            raft_term: 1,
            raft_index: index,
        };
        log.append(&mut builder, meta, NOW).unwrap();
    }
    log.sync().unwrap();
    assert!(
        log.segments().len() >= 2,
        "{} segments",
        log.segments().len()
    );
    let second_segment_first = log.segments()[1].first_raft_index();
    let frames = all_frames(&log);
    log.close().unwrap();
    (file_system, frames, second_segment_first)
}

fn all_frames(log: &Log) -> Vec<Bytes> {
    log.read_frames(FrameRange::RaftIndex {
        start: 1,
        end: ENTRIES + 1,
    })
    .unwrap()
    .into_iter()
    .map(|frame| frame.bytes)
    .collect()
}

/// Flips a bit inside the body of `frame` where it is stored.
fn damage(file_system: &MemoryFileSystem, frame: &[u8]) {
    for path in file_system.list(Path::new(DIRECTORY)).unwrap() {
        let path = Path::new(DIRECTORY).join(path);
        if path.extension().is_none_or(|extension| extension != "log") {
            continue;
        }
        let bytes = file_system.read(&path).unwrap();
        if let Some(position) = bytes
            .windows(frame.len())
            .position(|window| window == frame)
        {
            let bit = ((position + frame.len() - 2) * 8) as u64;
            file_system.flip_bit(&path, bit).unwrap();
            return;
        }
    }
    panic!("the frame is stored nowhere");
}

/// Repairs the damaged log and returns its holes (log closed).
fn repaired_holes(file_system: &MemoryFileSystem) -> Vec<RaftHole> {
    let log = open_at(file_system, RecoveryMode::Repair).unwrap();
    let segments: Vec<_> = log
        .segments()
        .iter()
        .map(|segment| segment.path().to_path_buf())
        .collect();
    let holes = log.raft_holes(&segments).unwrap();
    log.close().unwrap();
    holes
}

fn restore(
    file_system: &MemoryFileSystem,
    hole: &RaftHole,
    frames: &[Bytes],
) -> natswal::Result<()> {
    let shared: Arc<dyn FileSystem> = Arc::new(file_system.clone());
    restore_raft_frames(&shared, Path::new(DIRECTORY), &small_config(), hole, frames)
}

/// The peer's frames a hole is missing.
fn missing_frames(peer: &[Bytes], hole: &RaftHole) -> Vec<Bytes> {
    let missing = hole.missing().expect("an inner hole");
    peer[(missing.start - 1) as usize..(missing.end - 1) as usize].to_vec()
}

#[test]
fn damaged_entries_cost_only_their_frames_and_come_back_byte_for_byte() {
    let (file_system, peer, second_segment_first) = written();
    // A blank entry (no offsets: the repair marks it with a gap of no
    // offsets), two record entries in one segment and the first entry of
    // the next.
    let second = second_segment_first;
    let damaged = [30u64, 57, 121, second];
    assert!(second > 122, "{second}");
    for index in damaged {
        damage(&file_system, &peer[(index - 1) as usize]);
    }
    let holes = repaired_holes(&file_system);
    let missing: Vec<_> = holes.iter().map(|hole| hole.missing()).collect();
    assert_eq!(
        missing,
        damaged
            .iter()
            .map(|index| Some(*index..*index + 1))
            .collect::<Vec<_>>(),
        "{holes:?}"
    );
    // Everything but the damaged frames is still there after the repair.
    let log = open_at(&file_system, RecoveryMode::Strict).unwrap();
    let kept = log
        .read_frames(FrameRange::RaftIndex { start: 31, end: 57 })
        .unwrap();
    assert_eq!(kept.len(), 26);
    drop(log);

    // Anything but the exact frames is refused, naming why.
    let hole = &holes[1];
    let wrong = [
        (vec![peer[57].clone()], "expected Raft entry 57"),
        (vec![], "0 frames"),
        (
            vec![Bytes::from({
                let mut bytes = peer[56].to_vec();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                bytes
            })],
            "frame 57",
        ),
    ];
    for (frames, expected) in wrong {
        let error = restore(&file_system, hole, &frames)
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{error}");
    }

    for hole in &holes {
        restore(&file_system, hole, &missing_frames(&peer, hole)).unwrap();
    }
    assert!(repaired_holes(&file_system).is_empty());
    let error = restore(&file_system, &holes[0], &missing_frames(&peer, &holes[0]))
        .unwrap_err()
        .to_string();
    assert!(error.contains("no hole"), "{error}");
    let log = open_at(&file_system, RecoveryMode::Strict).unwrap();
    assert!(
        all_frames(&log) == peer,
        "the restored log is the peer's, byte for byte"
    );
}

#[test]
fn the_lost_last_entry_of_a_sealed_segment_is_one_hole_restored_in_its_segment() {
    let (file_system, peer, second_segment_first) = written();
    let last_of_first = second_segment_first - 1;
    damage(&file_system, &peer[(last_of_first - 1) as usize]);
    let holes = repaired_holes(&file_system);
    assert_eq!(holes.len(), 1, "{holes:?}");
    assert_eq!(
        holes[0].missing(),
        Some(last_of_first..second_segment_first)
    );
    restore(&file_system, &holes[0], &missing_frames(&peer, &holes[0])).unwrap();
    assert!(repaired_holes(&file_system).is_empty());
    let log = open_at(&file_system, RecoveryMode::Strict).unwrap();
    assert!(all_frames(&log) == peer, "byte for byte");
}

#[test]
fn a_restore_crashed_at_any_step_ends_like_an_uninterrupted_one_when_run_again() {
    // A record entry, then a blank one (its hole is marked by a gap of no
    // offsets).
    for index in [201u64, 200] {
        crash_a_restore_at_every_step(index);
    }
}

fn crash_a_restore_at_every_step(index: u64) {
    let (file_system, peer, _) = written();
    damage(&file_system, &peer[(index - 1) as usize]);
    let holes = repaired_holes(&file_system);
    assert_eq!(holes.len(), 1, "{holes:?}");
    let repaired = file_system.crash(0);
    let mut crashes = 0;
    for step in 1.. {
        let trial = repaired.crash(0);
        trial.crash_after_operations(step);
        let outcome = restore(&trial, &holes[0], &missing_frames(&peer, &holes[0]));
        let crashed = trial.has_crashed();
        assert!(crashed || outcome.is_ok(), "step {step}: {outcome:?}");
        let image = trial.crash(step);
        // Run again: the hole is found and closed, or it is gone already.
        for hole in repaired_holes(&image) {
            restore(&image, &hole, &missing_frames(&peer, &hole)).unwrap();
        }
        let log = open_at(&image, RecoveryMode::Strict)
            .unwrap_or_else(|error| panic!("step {step}: {error}"));
        assert!(
            all_frames(&log) == peer,
            "step {step}: the log differs from the peer's"
        );
        if !crashed {
            break;
        }
        crashes += 1;
    }
    assert!(crashes >= 4, "the restore has several steps ({crashes})");
}

/// Every sealed segment of `log` verifies against its sealing CRC.
fn sealed_segments_verify(log: &Log) -> bool {
    log.sealed_segments()
        .iter()
        .all(|segment| log.verify_sealed_segment(segment.base_offset).is_ok())
}

/// The peer's frames for each damaged range.
fn frames_for(peer: &[Bytes], damaged: &DamagedSegment) -> Vec<Vec<Bytes>> {
    damaged
        .ranges
        .iter()
        .map(|range| {
            let indexes = &range.raft_indexes;
            peer[(indexes.start - 1) as usize..(indexes.end - 1) as usize].to_vec()
        })
        .collect()
}

#[test]
fn a_sealed_segment_damaged_while_the_log_runs_is_restored_in_place_from_a_peer() {
    let (file_system, peer, second_segment_first) = written();
    let log = open_at(&file_system, RecoveryMode::Strict).unwrap();
    let first = log.sealed_segments()[0].clone();
    assert_eq!(first.first_raft_index, 1);
    assert_eq!(first.last_log_id.index + 1, second_segment_first);
    // A reader is inside the segment when it is damaged and restored.
    let mut reader =
        natswal::Reader::new(log.clone(), natswal::StartPosition::Earliest, None).unwrap();
    for _ in 0..10 {
        reader.next().unwrap().expect("records before the damage");
    }
    // A blank entry, two adjacent record entries, the segment's first and
    // its last entry.
    let last = first.last_log_id.index;
    let damaged_indexes = [1u64, 30, 57, 58, last];
    for index in damaged_indexes {
        damage(&file_system, &peer[(index - 1) as usize]);
    }
    let error = log.verify_sealed_segment(first.base_offset).unwrap_err();
    assert!(error.is_corruption(), "{error}");
    assert!(
        log.read_frames(FrameRange::RaftIndex { start: 57, end: 58 })
            .is_err(),
        "a damaged frame is never served"
    );

    let damaged = log
        .sealed_segment_damage(first.base_offset)
        .unwrap()
        .expect("the damage is found");
    let mut found: Vec<u64> = damaged
        .ranges
        .iter()
        .flat_map(|range| range.raft_indexes.clone())
        .collect();
    found.sort_unstable();
    assert_eq!(found, damaged_indexes, "{damaged:?}");
    assert_eq!(damaged.segment_crc, first.crc32c);

    // Anything but the peer's frames for exactly those entries is refused
    // and changes nothing.
    let mut shifted = frames_for(&peer, &damaged);
    shifted[0] = vec![peer[1].clone()];
    let error = log
        .restore_sealed_segment(&damaged, &shifted)
        .unwrap_err()
        .to_string();
    assert!(error.contains("expected Raft entry 1"), "{error}");
    let error = log
        .restore_sealed_segment(&damaged, &frames_for(&peer, &damaged)[1..])
        .unwrap_err()
        .to_string();
    assert!(error.contains("damaged ranges"), "{error}");
    assert!(log.verify_sealed_segment(first.base_offset).is_err());

    log.restore_sealed_segment(&damaged, &frames_for(&peer, &damaged))
        .unwrap();
    assert!(sealed_segments_verify(&log));
    assert_eq!(log.sealed_segment_damage(first.base_offset).unwrap(), None);
    assert!(all_frames(&log) == peer, "the log is the peer's again");
    let error = log
        .restore_sealed_segment(&damaged, &frames_for(&peer, &damaged))
        .unwrap_err()
        .to_string();
    assert!(error.contains("restored or removed since"), "{error}");
    // The reader goes on through the restored segment to the end, every
    // record in order.
    let mut next = reader.next().unwrap().expect("a record").offset + 1;
    while let Some(record) = reader.next().unwrap() {
        assert_eq!(record.offset, next);
        next += 1;
    }
    assert_eq!(next, log.written().next_offset);
    log.close().unwrap();
    let log = open_at(&file_system, RecoveryMode::Strict).unwrap();
    assert!(sealed_segments_verify(&log));
    assert!(all_frames(&log) == peer);
}

#[test]
fn a_sealed_segment_restore_crashed_at_any_step_leaves_the_damaged_segment_or_the_restored_one() {
    let (file_system, peer, _) = written();
    damage(&file_system, &peer[56]);
    let damaged_image = file_system.crash(0);
    let mut outcomes = [0usize; 2];
    for step in 1.. {
        let trial = damaged_image.crash(0);
        let log = open_at(&trial, RecoveryMode::Strict).unwrap();
        let base_offset = log.sealed_segments()[0].base_offset;
        let damaged = log.sealed_segment_damage(base_offset).unwrap().unwrap();
        trial.crash_after_operations(step);
        let outcome = log.restore_sealed_segment(&damaged, &frames_for(&peer, &damaged));
        let crashed = trial.has_crashed();
        assert!(crashed || outcome.is_ok(), "step {step}: {outcome:?}");
        drop(log);
        let image = trial.crash(step);
        let log = open_at(&image, RecoveryMode::Strict)
            .unwrap_or_else(|error| panic!("step {step}: {error}"));
        match log.sealed_segment_damage(base_offset).unwrap() {
            None => outcomes[1] += 1,
            Some(again) => {
                assert!(crashed, "step {step}: a finished restore was lost");
                assert_eq!(again.ranges, damaged.ranges, "step {step}");
                outcomes[0] += 1;
                log.restore_sealed_segment(&again, &frames_for(&peer, &again))
                    .unwrap();
            }
        }
        assert!(sealed_segments_verify(&log), "step {step}");
        assert!(all_frames(&log) == peer, "step {step}: the log differs");
        if !crashed {
            break;
        }
    }
    assert!(outcomes[0] >= 2 && outcomes[1] >= 2, "{outcomes:?}");
}
