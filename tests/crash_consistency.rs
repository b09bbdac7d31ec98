//! Crash consistency on real files: a log cut or zeroed at every byte of its
//! last frames recovers to exactly the frames wholly before the cut, and one
//! flipped bit anywhere is either refused with an error naming the file or
//! read back as a prefix of what was written, never as different data.

mod common;

use common::*;
use natswal::format::index::decode_index;
use natswal::{Error, Record, RecoveryMode, StreamOptions, FIRST_OFFSET};
use std::path::{Path, PathBuf};

/// Records written before the tail whose every byte is cut.
const BULK_RECORDS: u64 = 2000;
/// Frames of the last segment whose every byte position is tried.
const TAIL_FRAMES: usize = 4;

/// Writes the bulk with many appends in flight (multi-record frames), then
/// a tail of small frames (single records and an atomic batch), waits for
/// every append and for the sealed segments to be indexed.
async fn write_log(directory: &Path) -> (natswal::Stream, Vec<Record>) {
    let file_system = os_file_system();
    let stream = open(&file_system, directory, small_config()).unwrap();
    let mut expected: Vec<Record> = (0..BULK_RECORDS).map(record).collect();
    let outcomes = append_all(&stream, &expected).await;
    for (index, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome.first_offset, FIRST_OFFSET + index as u64);
    }
    // The tail must hold TAIL_FRAMES small frames in the last segment; a
    // rotation in the middle of it just means writing a little more.
    for round in 0..20u64 {
        let next = expected.len() as u64;
        let single = record(next);
        assert_eq!(
            stream.append(single.clone()).await.unwrap().first_offset,
            FIRST_OFFSET + next
        );
        expected.push(single);
        let batch: Vec<Record> = (next + 1..next + 4).map(record).collect();
        let outcome = stream.append_batch(batch.clone()).await.unwrap();
        assert_eq!(
            (outcome.first_offset, outcome.count),
            (FIRST_OFFSET + next + 1, 3)
        );
        expected.extend(batch);
        for index in next + 4..next + 6 {
            let single = record(index);
            assert_eq!(
                stream.append(single.clone()).await.unwrap().first_offset,
                FIRST_OFFSET + index
            );
            expected.push(single);
        }
        let last = segment_files(directory).pop().unwrap();
        let frames = frames_of(&std::fs::read(&last).unwrap());
        if frames.len() > TAIL_FRAMES {
            break;
        }
        assert!(
            round < 19,
            "the last segment never held {TAIL_FRAMES} frames"
        );
    }
    assert!(
        stream.status().segments >= 3,
        "multi-segment: {:?}",
        stream.status()
    );
    wait_sealed_segments_indexed(&stream).await;
    (stream, expected)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The file ends at the cut (`set_len`).
    Shorten,
    /// The file keeps its length; every byte from the cut on is zero.
    Zero,
}

fn cut_file(path: &Path, position: u64, cut: Cut) {
    match cut {
        Cut::Shorten => {
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            file.set_len(position).unwrap();
        }
        Cut::Zero => {
            let mut bytes = std::fs::read(path).unwrap();
            bytes[position as usize..].fill(0);
            std::fs::write(path, bytes).unwrap();
        }
    }
}

/// Replays a crash at every byte of the last frames of `base` (a stream
/// directory as a crash left it) and checks what recovery makes of it.
async fn cut_at_every_byte(base: &Path, expected: &[Record]) {
    let last = segment_files(base).pop().unwrap();
    let last_name = last.file_name().unwrap().to_owned();
    let bytes = std::fs::read(&last).unwrap();
    let frames = frames_of(&bytes);
    assert!(frames.len() > TAIL_FRAMES, "{} frames", frames.len());
    let segment_base = frames[0].base_offset;
    let data_end = frames.last().unwrap().end;
    assert_eq!(
        frames.last().unwrap().base_offset + u64::from(frames.last().unwrap().record_count),
        FIRST_OFFSET + expected.len() as u64,
        "the last frame holds the last record"
    );
    // What the active segment's checkpoint vouches for, if there is one: a
    // crash cannot tear bytes that were durable when it was written.
    let checkpoint = std::fs::read(last.with_extension("idx"))
        .ok()
        .and_then(|index| decode_index(&index).ok())
        .map(|(header, _)| header.data_length);
    let first = frames[frames.len() - TAIL_FRAMES].start;
    let file_system = os_file_system();
    let mut checked = [0u64; 2];
    for position in first..=data_end {
        let wholly_before: u64 = frames
            .iter()
            .filter(|frame| frame.end <= position)
            .map(|frame| u64::from(frame.record_count))
            .sum();
        // Offset after the records kept, and how many records that is.
        let next_offset = segment_base + wholly_before;
        let kept = index_of(next_offset);
        let inside = frames
            .iter()
            .find(|frame| frame.start < position && position < frame.end);
        for cut in [Cut::Shorten, Cut::Zero] {
            let trial = tempfile::tempdir().unwrap();
            copy_directory(base, trial.path());
            let trial_last = trial.path().join(&last_name);
            cut_file(&trial_last, position, cut);
            let (stream, report) =
                open_reported(&file_system, trial.path(), options(small_config())).unwrap_or_else(
                    |error| panic!("open after a {cut:?} cut at {position}: {error}"),
                );
            let (records, error) = read_until_error(&stream);
            let vouched = checkpoint.is_some_and(|length| position < length);
            if cut == Cut::Zero && vouched {
                // Zeros where the checkpoint vouches for frames are damage,
                // which open does not scan: the reader reports it, with the
                // file and the position, after the records before it.
                let error = error.unwrap_or_else(|| {
                    panic!("zeroed checkpointed bytes at {position} were read without error")
                });
                let frame_start = frames
                    .iter()
                    .find(|frame| frame.end > position)
                    .unwrap()
                    .start;
                match &error {
                    Error::Corruption {
                        path, position: at, ..
                    } => {
                        assert_eq!(path, &trial_last);
                        assert_eq!(*at, frame_start);
                    }
                    other => panic!("expected corruption, got {other}"),
                }
                assert_exactly(&records, &expected[..kept]);
                continue;
            }
            if let Some(error) = error {
                panic!(
                    "{cut:?} cut at {position}: read failed after {} records: {error}",
                    records.len()
                );
            }
            assert_exactly(&records, &expected[..kept]);
            assert_eq!(
                stream.status().next_offset,
                next_offset,
                "{cut:?} cut at {position}"
            );
            // A cut strictly inside a frame is a torn tail, reported at the
            // frame's start; a cut between frames loses nothing to report,
            // and neither does one that left only zero bytes of the frame
            // (its slot checksum can start with a zero byte): they are what
            // an unwritten region holds, so no reader can tell them apart.
            let remnant_is_zeros = inside.is_some_and(|frame| {
                bytes[frame.start as usize..position as usize]
                    .iter()
                    .all(|byte| *byte == 0)
            });
            match inside.filter(|_| !remnant_is_zeros) {
                Some(frame) => {
                    assert_eq!(
                        report.truncated.len(),
                        1,
                        "{cut:?} cut at {position}: {report:?}"
                    );
                    assert_eq!(report.truncated[0].position, frame.start);
                    assert_eq!(report.truncated[0].segment, trial_last);
                }
                None => assert!(report.truncated.is_empty(), "{report:?}"),
            }
            // Appends continue right after the kept records (sampled: each
            // costs a sync).
            if position % 16 == 0 || inside.is_none() {
                let outcome = stream.append(record(kept as u64)).await.unwrap();
                assert_eq!(
                    outcome.first_offset, next_offset,
                    "{cut:?} cut at {position}"
                );
            }
            checked[cut as usize] += 1;
            stream.close().unwrap();
        }
    }
    assert!(
        checked[0] > 100 && checked[1] > 0,
        "positions checked: {checked:?}"
    );
}

#[tokio::test]
async fn crash_by_forgetting_the_stream_then_cut_at_every_byte() {
    let directory = tempfile::tempdir().unwrap();
    let (stream, expected) = write_log(directory.path()).await;
    // A crash: no close, no final checkpoint; the threads just stop mattering.
    std::mem::forget(stream);
    let base = tempfile::tempdir().unwrap();
    copy_directory(directory.path(), base.path());
    cut_at_every_byte(base.path(), &expected).await;
}

/// After a clean close every record was acknowledged and durable, so a cut
/// anywhere in the last segment is damage, never a torn tail: the strict
/// open refuses, naming the file and the damaged frame; a repair keeps
/// every frame before it, records the lost offsets, and appends go on after
/// them (the case where 5 cut bytes used to cost thousands of records).
#[tokio::test]
async fn clean_close_then_a_cut_at_every_byte_is_damage_that_a_repair_confines() {
    let directory = tempfile::tempdir().unwrap();
    let (stream, expected) = write_log(directory.path()).await;
    stream.close().unwrap();
    drop(stream);
    let last = segment_files(directory.path()).pop().unwrap();
    // Also without the checkpoint: the clean shutdown alone vouches.
    std::fs::remove_file(last.with_extension("idx")).unwrap();
    let last_name = last.file_name().unwrap().to_owned();
    let frames = frames_of(&std::fs::read(&last).unwrap());
    assert!(frames.len() > TAIL_FRAMES, "{} frames", frames.len());
    let data_end = frames.last().unwrap().end;
    let total_next = FIRST_OFFSET + expected.len() as u64;
    let first = frames[frames.len() - TAIL_FRAMES].start;
    let file_system = os_file_system();
    let mut repaired = 0;
    for position in first..=data_end {
        for cut in [Cut::Shorten, Cut::Zero] {
            let trial = tempfile::tempdir().unwrap();
            copy_directory(directory.path(), trial.path());
            let trial_last = trial.path().join(&last_name);
            cut_file(&trial_last, position, cut);
            if position == data_end {
                let (stream, _) =
                    open_reported(&file_system, trial.path(), options(small_config()))
                        .unwrap_or_else(|error| panic!("{cut:?} cut at the end: {error}"));
                assert_exactly(&read_all(&stream).unwrap(), &expected);
                continue;
            }
            let damaged = frames
                .iter()
                .find(|frame| frame.start <= position && position < frame.end)
                .unwrap();
            let error = open_reported(&file_system, trial.path(), options(small_config()))
                .expect_err("acknowledged records were cut: damage");
            match &error {
                Error::Corruption {
                    path, position: at, ..
                } => {
                    assert_eq!(path, &trial_last, "{cut:?} cut at {position}");
                    assert_eq!(*at, damaged.start, "{cut:?} cut at {position}: {error}");
                }
                other => panic!("{cut:?} cut at {position}: expected corruption, got {other}"),
            }
            // Repairs are sampled: each one rewrites the segment.
            if position % 13 != 0 && position != damaged.start {
                continue;
            }
            let (stream, report) = open_reported(&file_system, trial.path(), repair_options())
                .unwrap_or_else(|error| panic!("{cut:?} cut at {position}: repair: {error}"));
            assert_eq!(
                report.lost.len(),
                1,
                "{cut:?} cut at {position}: {report:?}"
            );
            assert_eq!(
                (report.lost[0].first_offset, report.lost[0].next_offset),
                (damaged.base_offset, total_next),
                "{cut:?} cut at {position}"
            );
            assert!(
                report
                    .quarantined
                    .iter()
                    .all(|range| range.start == damaged.start),
                "{report:?}"
            );
            let kept = index_of(damaged.base_offset);
            assert_exactly(&read_all(&stream).unwrap(), &expected[..kept]);
            assert_eq!(stream.status().next_offset, total_next);
            let outcome = stream.append(record(expected.len() as u64)).await.unwrap();
            assert_eq!(
                outcome.first_offset, total_next,
                "the lost offsets are not reused"
            );
            stream.close().unwrap();
            drop(stream);
            let verified =
                natswal::RecoveryManager::verify(&file_system, trial.path(), &mut |_| {}).unwrap();
            assert!(
                verified.is_healthy(),
                "{cut:?} cut at {position}: {verified:?}"
            );
            repaired += 1;
        }
    }
    assert!(repaired > 10, "{repaired} repairs checked");
}

fn repair_options() -> StreamOptions {
    StreamOptions {
        config: small_config(),
        recovery_mode: RecoveryMode::Repair,
        ..StreamOptions::default()
    }
}

// ---------------------------------------------------------------------------
// One flipped bit.

fn stream_files(directory: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "log" || extension == "idx")
        })
        .collect();
    files.sort();
    files
}

/// Picks a bit to flip, favouring the structures a flip is most likely to
/// confuse: segment and index headers and frame headers.
fn pick_bit(random: &mut Random, path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let length = bytes.len() as u64;
    let is_log = path.extension().is_some_and(|extension| extension == "log");
    let byte = match random.below(4) {
        0 => random.below(length.min(if is_log { 64 } else { 96 })),
        1 if is_log => {
            let frames = frames_of(&bytes);
            let frame = frames[random.below(frames.len() as u64) as usize];
            frame.start + random.below(96)
        }
        _ => {
            // Mostly where there is data: the active segment is mostly zeros.
            let data_end = if is_log {
                frames_of(&bytes).last().map_or(64, |frame| frame.end)
            } else {
                length
            };
            if random.below(4) == 0 {
                random.below(length)
            } else {
                random.below(data_end)
            }
        }
    };
    byte * 8 + random.below(8)
}

fn flip_bit(path: &Path, bit: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
    std::fs::write(path, bytes).unwrap();
}

/// Opens in repair mode (again while a repair asks for it) and checks that
/// everything read back is the original record at its offset.
fn repair_and_check(directory: &Path, expected: &[Record], trial: &str) {
    let file_system = os_file_system();
    let repair = StreamOptions {
        config: small_config(),
        recovery_mode: RecoveryMode::Repair,
        ..StreamOptions::default()
    };
    let mut quarantined = 0;
    for attempt in 0..4 {
        match open_reported(&file_system, directory, repair.clone()) {
            Ok((stream, report)) => {
                quarantined += report.quarantined.len();
                assert!(quarantined > 0, "{trial}: repair quarantined nothing");
                let (records, error) = read_until_error(&stream);
                assert!(error.is_none(), "{trial}: read after repair: {error:?}");
                assert!(!records.is_empty(), "{trial}: nothing left after repair");
                let mut previous = None;
                for stored in &records {
                    assert!(previous < Some(stored.offset), "{trial}: offsets go back");
                    previous = Some(stored.offset);
                    assert_record(stored, &expected[index_of(stored.offset)], stored.offset);
                }
                for range in &report.quarantined {
                    assert!(range.saved_to.starts_with(directory.join("quarantine")));
                    assert!(range.saved_to.exists(), "{trial}: {range:?}");
                }
                return;
            }
            Err(Error::InvalidInput(message)) if message.contains("open the stream again") => {
                // A whole segment was moved aside; the next open goes on.
                assert!(attempt < 3, "{trial}: repair keeps asking to reopen");
                quarantined += 1;
            }
            Err(error) => panic!("{trial}: repair failed: {error}"),
        }
    }
    panic!("{trial}: repair did not finish");
}

#[test]
fn one_flipped_bit_is_refused_or_reported_never_read_as_other_data() {
    let directory = tempfile::tempdir().unwrap();
    let expected: Vec<Record> = (0..3000).map(record).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stream = open(&os_file_system(), directory.path(), small_config()).unwrap();
        append_all(&stream, &expected).await;
        assert!(stream.status().segments >= 3, "{:?}", stream.status());
        stream.close().unwrap();
    });
    let file_system = os_file_system();
    let mut outcomes = std::collections::BTreeMap::<&str, u32>::new();
    for seed in 0..300u64 {
        let mut random = Random(seed);
        let trial = tempfile::tempdir().unwrap();
        copy_directory(directory.path(), trial.path());
        // Half of the trials look like a crash: no checkpoint for the
        // active segment, so open validates all of it.
        let unclean = seed % 2 == 1;
        if unclean {
            let last = segment_files(trial.path()).pop().unwrap();
            std::fs::remove_file(last.with_extension("idx")).unwrap();
        }
        let files = stream_files(trial.path());
        let target = files[random.below(files.len() as u64) as usize].clone();
        let bit = pick_bit(&mut random, &target);
        flip_bit(&target, bit);
        let name = format!(
            "seed {seed}: bit {bit} (byte {}) of {}{}",
            bit / 8,
            target.display(),
            if unclean { ", no checkpoint" } else { "" }
        );
        match open_reported(&file_system, trial.path(), options(small_config())) {
            Err(error) => {
                let message = error.to_string();
                assert!(
                    matches!(
                        error,
                        Error::Corruption { .. } | Error::UnsupportedVersion { .. }
                    ),
                    "{name}: open failed with {message}"
                );
                assert!(
                    message.contains(&target.display().to_string()),
                    "{name}: the error does not name the damaged file: {message}"
                );
                *outcomes.entry("refused").or_default() += 1;
                repair_and_check(trial.path(), &expected, &name);
            }
            Ok((stream, _)) => {
                let (records, error) = read_until_error(&stream);
                assert_prefix(&records, &expected);
                match error {
                    Some(error) => {
                        assert!(error.is_corruption(), "{name}: read failed with {error}");
                        assert!(
                            error.to_string().contains(&target.display().to_string()),
                            "{name}: the error does not name the damaged file: {error}"
                        );
                        *outcomes.entry("read error").or_default() += 1;
                    }
                    None if unclean => {
                        *outcomes.entry("prefix").or_default() += 1;
                    }
                    None => {
                        // After a clean shutdown nothing may go missing
                        // silently: all of it, or an error.
                        assert_eq!(records.len(), expected.len(), "{name}");
                        *outcomes.entry("all").or_default() += 1;
                    }
                }
            }
        }
    }
    // The trials reached every kind of outcome.
    for kind in ["refused", "read error", "all"] {
        assert!(
            outcomes.get(kind).is_some_and(|count| *count > 0),
            "{outcomes:?}"
        );
    }
}
