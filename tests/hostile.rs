//! Hostile input: payloads that carry whole valid frames and slot headers
//! cannot change what recovery decides; a segment cut by another program
//! under a live stream is an error naming it, never a SIGBUS; a damaged
//! metadata file fails closed and a repair rebuilds it without reusing a
//! nonce epoch.

mod common;

use bytes::Bytes;
use common::*;
use natswal::format::frame::{encode_plain_frame, SlotHeader};
use natswal::{
    Cipher, EncryptionConfig, Error, Key, Keyring, Record, RecoveryMode, StreamConfig,
    StreamOptions, FIRST_OFFSET,
};
use std::path::Path;
use std::sync::Arc;

const RECORDS: u64 = 300;
const PAYLOAD_BYTES: usize = 700;

/// What a publisher who wants to fool recovery would send: whole valid
/// frames with slot headers claiming everything is durable, at every
/// alignment it can guess. It cannot know the segment's salt.
fn forged_payload(index: u64) -> Bytes {
    let inner = encode_plain_frame(
        FIRST_OFFSET + index + 1,
        &[(Record::new("forged.subject", "forged payload"), 5)],
        0,
        0,
        0,
    );
    let slot = SlotHeader {
        frame_length: inner.len() as u32,
        durable_position: u32::MAX,
        generation: u32::MAX,
    };
    let mut payload = Vec::with_capacity(PAYLOAD_BYTES);
    for salt in [0u64, 1, index, u64::MAX] {
        payload.extend_from_slice(&slot.encode(natswal::format::frame::salt_state(salt)));
        payload.extend_from_slice(&inner);
    }
    payload.resize(PAYLOAD_BYTES, 0xab);
    Bytes::from(payload)
}

fn random_payload(index: u64) -> Bytes {
    let mut random = Random(index * 7919 + 17);
    Bytes::from(
        (0..PAYLOAD_BYTES)
            .map(|_| random.below(256) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// A stream of single-record frames, each synced before the next (so every
/// frame proves the ones before it durable), left as a crash leaves it.
async fn crashed_stream(directory: &Path, payload: fn(u64) -> Bytes) {
    let stream = open(&os_file_system(), directory, small_config()).unwrap();
    for index in 0..RECORDS {
        let record = Record::new(format!("orders.{index}"), payload(index));
        stream.append(record).await.unwrap();
    }
    std::mem::forget(stream);
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    opened: Result<(), (u64, String)>,
    records: usize,
    torn: Vec<u64>,
}

fn outcome_after(base: &Path, position: u64, damage: u8) -> Outcome {
    let trial = tempfile::tempdir().unwrap();
    copy_directory(base, trial.path());
    let last = segment_files(trial.path()).pop().unwrap();
    // As if the crash came before any checkpoint: recovery walks it all
    // (checkpoints are written by time too, so they differ between runs).
    let _ = std::fs::remove_file(last.with_extension("idx"));
    let mut bytes = std::fs::read(&last).unwrap();
    match damage {
        0 => bytes.truncate(position as usize),
        1 => bytes[position as usize..].fill(0),
        _ => bytes[position as usize] ^= 0x20,
    }
    std::fs::write(&last, &bytes).unwrap();
    match open_reported(&os_file_system(), trial.path(), options(small_config())) {
        Ok((stream, report)) => Outcome {
            opened: Ok(()),
            records: read_until_error(&stream).0.len(),
            torn: report.truncated.iter().map(|tail| tail.position).collect(),
        },
        Err(Error::Corruption {
            position, reason, ..
        }) => Outcome {
            opened: Err((position, reason.split(';').next().unwrap_or("").to_string())),
            records: 0,
            torn: Vec::new(),
        },
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test]
async fn payloads_holding_valid_frames_do_not_change_what_recovery_decides() {
    let forged = tempfile::tempdir().unwrap();
    let random = tempfile::tempdir().unwrap();
    crashed_stream(forged.path(), forged_payload).await;
    crashed_stream(random.path(), random_payload).await;
    let last_forged = segment_files(forged.path()).pop().unwrap();
    let frames = frames_of(&std::fs::read(&last_forged).unwrap());
    let frames_random =
        frames_of(&std::fs::read(segment_files(random.path()).pop().unwrap()).unwrap());
    assert_eq!(
        frames
            .iter()
            .map(|frame| (frame.start, frame.end))
            .collect::<Vec<_>>(),
        frames_random
            .iter()
            .map(|frame| (frame.start, frame.end))
            .collect::<Vec<_>>(),
        "both streams have the same layout"
    );
    let first = frames[frames.len() - 4].start;
    let end = frames.last().unwrap().end;
    let mut checked = 0;
    for position in (first..end).step_by(7) {
        for damage in 0..3u8 {
            let with_forged = outcome_after(forged.path(), position, damage);
            let with_random = outcome_after(random.path(), position, damage);
            assert_eq!(
                with_forged, with_random,
                "damage {damage} at byte {position}"
            );
            checked += 1;
        }
    }
    assert!(checked > 300, "{checked} cases");
}

#[tokio::test]
async fn a_sealed_segment_cut_under_a_live_stream_is_an_error_not_sigbus() {
    for file_system in [os_file_system(), mmap_file_system()] {
        let directory = tempfile::tempdir().unwrap();
        let stream = open(&file_system, directory.path(), small_config()).unwrap();
        let expected: Vec<Record> = (0..4000).map(record).collect();
        append_all(&stream, &expected).await;
        wait_sealed_segments_indexed(&stream).await;
        // Read everything once, so the sealed segments are open.
        assert_exactly(&read_all(&stream).unwrap(), &expected);
        let segments = stream.sealed_segments();
        let victim = &segments[1];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&victim.path)
            .unwrap()
            .set_len(100)
            .unwrap();
        let (records, error) = read_until_error(&stream);
        match error {
            Some(Error::Corruption { path, .. }) => assert_eq!(path, victim.path),
            other => panic!(
                "expected corruption naming {}, got {other:?}",
                victim.path.display()
            ),
        }
        assert_eq!(records.len() as u64, victim.base_offset - FIRST_OFFSET);
        // What is intact stays readable, and appends go on.
        let mut reader = stream
            .reader(natswal::StartPosition::Offset(victim.next_offset), None)
            .unwrap();
        let first_after = reader.next().unwrap().unwrap();
        assert_eq!(first_after.offset, victim.next_offset);
        let outcome = stream.append(record(4000)).await.unwrap();
        assert_eq!(outcome.first_offset, FIRST_OFFSET + 4000);
        stream.close().unwrap();
    }
}

#[tokio::test]
async fn damaged_metadata_fails_closed_and_a_repair_never_reuses_a_nonce_epoch() {
    let directory = tempfile::tempdir().unwrap();
    let config = StreamConfig {
        encryption: Some(EncryptionConfig {
            cipher: Cipher::Aes256Gcm,
            key_id: 1,
        }),
        ..small_config()
    };
    let options_with = |mode| StreamOptions {
        config: config.clone(),
        recovery_mode: mode,
        keyring: Arc::new(Keyring::new([Key::new(1, [8; 32])])),
        ..StreamOptions::default()
    };
    let epochs = |directory: &Path| -> Vec<u32> {
        let mut epochs = Vec::new();
        for segment in segment_files(directory) {
            let bytes = std::fs::read(&segment).unwrap();
            for frame in frames_of(&bytes) {
                let start = frame.start as usize + 16;
                epochs.push(u32::from_le_bytes(
                    bytes[start + 74..start + 78].try_into().unwrap(),
                ));
            }
        }
        epochs
    };
    for round in 0..3u64 {
        let (stream, _) = open_reported(
            &os_file_system(),
            directory.path(),
            options_with(RecoveryMode::Strict),
        )
        .unwrap();
        for index in 0..20 {
            stream.append(record(round * 20 + index)).await.unwrap();
        }
        stream.close().unwrap();
    }
    let before = epochs(directory.path());
    let metadata = directory.path().join("stream.meta");
    let mut bytes = std::fs::read(&metadata).unwrap();
    bytes[20] ^= 0x01;
    std::fs::write(&metadata, &bytes).unwrap();
    let error = open_reported(
        &os_file_system(),
        directory.path(),
        options_with(RecoveryMode::Strict),
    )
    .expect_err("a damaged metadata file fails closed");
    assert!(
        error.to_string().contains("stream.meta") && error.to_string().contains("natswal repair"),
        "{error}"
    );
    let (stream, report) = open_reported(
        &os_file_system(),
        directory.path(),
        options_with(RecoveryMode::Repair),
    )
    .unwrap();
    assert!(report.rebuilt_metadata, "{report:?}");
    for index in 0..20 {
        stream.append(record(100 + index)).await.unwrap();
    }
    stream.close().unwrap();
    drop(stream);
    let after = epochs(directory.path());
    let newest_before = *before.iter().max().unwrap();
    let fresh: Vec<u32> = after[before.len()..].to_vec();
    assert_eq!(fresh.len(), 20);
    assert!(
        fresh.iter().all(|epoch| *epoch > newest_before),
        "new epochs {fresh:?} must be above every old one (<= {newest_before})"
    );
    // A missing metadata file (with segments) fails closed too.
    std::fs::remove_file(&metadata).unwrap();
    let error = open_reported(
        &os_file_system(),
        directory.path(),
        options_with(RecoveryMode::Strict),
    )
    .expect_err("missing metadata fails closed");
    assert!(error.to_string().contains("missing"), "{error}");
}
