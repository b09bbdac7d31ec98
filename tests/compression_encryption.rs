//! Compression and encryption at rest: every combination round-trips across
//! restarts and rotation; encrypted segments hold no plaintext; wrong,
//! missing or tampered keys and frames give clear errors, never data; keys
//! rotate.

mod common;

use common::*;
use natswal::{Cipher, Compression, EncryptionConfig, Key, Keyring, StreamOptions};
use std::path::Path;
use std::sync::Arc;

const MARKER: &str = "MARKER-7f3c-plaintext";

fn json_record(index: u64) -> natswal::Record {
    natswal::Record::new(
        format!("events.{}", index % 7),
        format!(
            "{{\"id\":{index},\"user\":\"user-{}\",\"note\":\"{MARKER}\",\"pad\":\"{}\"}}",
            index % 13,
            "x".repeat((index % 40) as usize)
        ),
    )
}

fn open_with(
    directory: &Path,
    compression: Compression,
    encryption: Option<EncryptionConfig>,
    keys: Vec<Key>,
) -> natswal::Result<natswal::Stream> {
    let options = StreamOptions {
        config: natswal::StreamConfig {
            compression,
            encryption,
            ..small_config()
        },
        keyring: Arc::new(Keyring::new(keys)),
        ..StreamOptions::default()
    };
    natswal::Stream::open(
        os_file_system(),
        directory,
        "test",
        Arc::new(natswal::SegmentCache::new(8)),
        options,
    )
    .map(|(stream, _)| stream)
}

fn key(id: u32) -> Key {
    Key::new(id, [id as u8 * 17; 32])
}

fn files_contain(directory: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(directory)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".log"))
        .any(|entry| memchr::memmem::find(&std::fs::read(entry.path()).unwrap(), needle).is_some())
}

#[tokio::test]
async fn every_combination_round_trips_across_restarts_and_rotation() {
    for compression in [
        Compression::None,
        Compression::Zstd { level: 1 },
        Compression::Zstd { level: 3 },
    ] {
        for cipher in [
            None,
            Some(Cipher::Aes256Gcm),
            Some(Cipher::ChaCha20Poly1305),
        ] {
            let directory = tempfile::tempdir().unwrap();
            let encryption = cipher.map(|cipher| EncryptionConfig { cipher, key_id: 1 });
            let expected: Vec<_> = (0..3000).map(json_record).collect();
            for round in 0..2 {
                let stream =
                    open_with(directory.path(), compression, encryption, vec![key(1)]).unwrap();
                for record in &expected[round * 1500..(round + 1) * 1500] {
                    stream.append(record.clone()).await.unwrap();
                }
                stream.close().unwrap();
            }
            let stream =
                open_with(directory.path(), compression, encryption, vec![key(1)]).unwrap();
            assert!(stream.status().segments > 2, "small segments rotated");
            assert_prefix(&read_all(&stream).unwrap(), &expected);
            assert_eq!(read_all(&stream).unwrap().len(), expected.len());
            drop(stream);
            // Compression is not concealment (zstd keeps literals); only
            // encryption keeps the marker off the disk.
            assert_eq!(
                files_contain(directory.path(), MARKER.as_bytes()),
                cipher.is_none(),
                "{compression:?} {cipher:?}: plaintext marker on disk exactly when not encrypted"
            );
        }
    }
}

#[tokio::test]
async fn compression_cuts_json_bytes_and_stores_incompressible_frames_plain() {
    let plain_directory = tempfile::tempdir().unwrap();
    let zstd_directory = tempfile::tempdir().unwrap();
    let plain = open_with(plain_directory.path(), Compression::None, None, Vec::new()).unwrap();
    let zstd = open_with(
        zstd_directory.path(),
        Compression::Zstd { level: 1 },
        None,
        Vec::new(),
    )
    .unwrap();
    let batch: Vec<_> = (0..200).map(json_record).collect();
    plain.append_batch(batch.clone()).await.unwrap();
    zstd.append_batch(batch).await.unwrap();
    assert!(
        zstd.status().bytes * 2 < plain.status().bytes,
        "{} vs {}",
        zstd.status().bytes,
        plain.status().bytes
    );
    // Random bytes do not compress: the frame is stored plain, and reads.
    let noise: Vec<u8> = (0..4000u32)
        .map(|index| (index.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    zstd.append(natswal::Record::new("noise", noise.clone()))
        .await
        .unwrap();
    let stored = read_all(&zstd).unwrap();
    assert_eq!(stored.last().unwrap().payload, noise);
}

#[tokio::test]
async fn wrong_missing_key_and_tampering_are_clear_errors() {
    let directory = tempfile::tempdir().unwrap();
    let encryption = Some(EncryptionConfig {
        cipher: Cipher::Aes256Gcm,
        key_id: 1,
    });
    let stream = open_with(
        directory.path(),
        Compression::None,
        encryption,
        vec![key(1)],
    )
    .unwrap();
    for index in 0..50 {
        stream.append(json_record(index)).await.unwrap();
    }
    stream.close().unwrap();
    drop(stream);
    // Missing key at open: the stream is to be written with it.
    let error = open_with(directory.path(), Compression::None, encryption, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("key id 1") && error.contains("not configured"),
        "{error}"
    );
    // Old data with a wrong key: reading fails naming segment and key.
    let wrong = open_with(
        directory.path(),
        Compression::None,
        None,
        vec![Key::new(1, [9; 32])],
    )
    .unwrap();
    let error = read_all(&wrong).unwrap_err().to_string();
    assert!(
        error.contains(".log") && error.contains("key id 1") && error.contains("authentication"),
        "{error}"
    );
    drop(wrong);
    // Old data without its key configured.
    let without = open_with(directory.path(), Compression::None, None, Vec::new()).unwrap();
    let error = read_all(&without).unwrap_err().to_string();
    assert!(
        error.contains("key id 1") && error.contains("not configured"),
        "{error}"
    );
    drop(without);
    // Tampered ciphertext (CRC recomputed, so only the AEAD can notice).
    let segment = std::fs::read_dir(directory.path())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    // The first frame follows the segment header and its 16-byte slot.
    let frame = 64usize + 16;
    let frame_length =
        u32::from_le_bytes(bytes[frame + 8..frame + 12].try_into().unwrap()) as usize;
    bytes[frame + 100] ^= 0x40;
    let body_crc = crc32c::crc32c(&bytes[frame + 96..frame + frame_length]);
    bytes[frame + 12..frame + 16].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&bytes[frame + 8..frame + 96]);
    bytes[frame + 4..frame + 8].copy_from_slice(&header_crc.to_le_bytes());
    std::fs::write(&segment, &bytes).unwrap();
    let reader = open_with(
        directory.path(),
        Compression::None,
        encryption,
        vec![key(1)],
    )
    .unwrap();
    let error = read_all(&reader).unwrap_err().to_string();
    assert!(error.contains("authentication"), "{error}");
}

#[tokio::test]
async fn key_rotation_keeps_old_data_readable_and_writes_new_data_with_the_new_key() {
    let directory = tempfile::tempdir().unwrap();
    let first = Some(EncryptionConfig {
        cipher: Cipher::ChaCha20Poly1305,
        key_id: 1,
    });
    let stream = open_with(directory.path(), Compression::None, first, vec![key(1)]).unwrap();
    for index in 0..100 {
        stream.append(json_record(index)).await.unwrap();
    }
    stream.close().unwrap();
    drop(stream);
    let second = Some(EncryptionConfig {
        cipher: Cipher::ChaCha20Poly1305,
        key_id: 2,
    });
    let stream = open_with(
        directory.path(),
        Compression::None,
        second,
        vec![key(1), key(2)],
    )
    .unwrap();
    for index in 100..200 {
        stream.append(json_record(index)).await.unwrap();
    }
    let expected: Vec<_> = (0..200).map(json_record).collect();
    assert_prefix(&read_all(&stream).unwrap(), &expected);
    stream.close().unwrap();
    drop(stream);
    // Which key each segment names.
    let mut key_ids = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(directory.path())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    names.sort();
    for path in &names {
        let header = std::fs::read(path).unwrap();
        key_ids.push(u32::from_le_bytes(header[32..36].try_into().unwrap()));
    }
    assert_eq!(key_ids.first(), Some(&1));
    assert_eq!(key_ids.last(), Some(&2));
    // With only the new key, the new records still read; the old ones fail
    // with an error naming key 1.
    let only_new = open_with(directory.path(), Compression::None, second, vec![key(2)]).unwrap();
    let mut reader = only_new
        .reader(
            natswal::StartPosition::Offset(natswal::FIRST_OFFSET + 150),
            None,
        )
        .unwrap();
    assert_eq!(
        reader.next().unwrap().unwrap().payload,
        expected[150].payload
    );
    let error = read_all(&only_new).unwrap_err().to_string();
    assert!(error.contains("key id 1"), "{error}");
}

#[tokio::test]
async fn nonces_never_repeat_across_restarts_and_truncation() {
    let directory = tempfile::tempdir().unwrap();
    let encryption = Some(EncryptionConfig {
        cipher: Cipher::Aes256Gcm,
        key_id: 1,
    });
    let mut nonces = std::collections::HashSet::new();
    let collect = |nonces: &mut std::collections::HashSet<[u8; 12]>| {
        let mut fresh = 0;
        for entry in std::fs::read_dir(directory.path())
            .unwrap()
            .filter_map(|entry| entry.ok())
        {
            if !entry.file_name().to_string_lossy().ends_with(".log") {
                continue;
            }
            let bytes = std::fs::read(entry.path()).unwrap();
            for span in frames_of(&bytes) {
                let frame = span.start as usize + 16;
                let nonce: [u8; 12] = bytes[frame + 72..frame + 84].try_into().unwrap();
                if nonces.insert(nonce) {
                    fresh += 1;
                }
            }
        }
        fresh
    };
    for round in 0..3u64 {
        let stream = open_with(
            directory.path(),
            Compression::None,
            encryption,
            vec![key(1)],
        )
        .unwrap();
        for index in 0..20 {
            stream
                .append(json_record(round * 100 + index))
                .await
                .unwrap();
        }
        stream.close().unwrap();
        drop(stream);
        assert_eq!(
            collect(&mut nonces),
            20,
            "round {round}: 20 new frames, 20 new nonces"
        );
        // Cut the last 10 records and write them again: new nonces.
        let next = natswal::FIRST_OFFSET + round * 20 + 10;
        natswal::RecoveryManager::truncate_suffix(&os_file_system(), directory.path(), next)
            .unwrap();
        let stream = open_with(
            directory.path(),
            Compression::None,
            encryption,
            vec![key(1)],
        )
        .unwrap();
        for index in 10..20 {
            stream
                .append(json_record(round * 100 + index))
                .await
                .unwrap();
        }
        stream.close().unwrap();
        drop(stream);
        assert_eq!(
            collect(&mut nonces),
            10,
            "round {round}: rewritten frames got fresh nonces"
        );
    }
}

#[tokio::test]
async fn stored_frames_are_handed_on_as_on_disk_and_decrypt_without_recompressing() {
    let directory = tempfile::tempdir().unwrap();
    let encryption = Some(EncryptionConfig {
        cipher: Cipher::Aes256Gcm,
        key_id: 1,
    });
    let compression = Compression::Zstd { level: 1 };
    let stream = open_with(directory.path(), compression, encryption, vec![key(1)]).unwrap();
    let expected: Vec<_> = (0..2000).map(json_record).collect();
    for chunk in expected.chunks(100) {
        stream.append_batch(chunk.to_vec()).await.unwrap();
    }
    let files: Vec<Vec<u8>> = segment_files(directory.path())
        .iter()
        .map(|path| std::fs::read(path).unwrap())
        .collect();
    // Start inside a frame: the first frame still arrives whole.
    let start = 150;
    let mut reader = stream
        .reader(natswal::StartPosition::Offset(start), None)
        .unwrap();
    let mut decoded = Vec::new();
    let mut frames = 0;
    while let Some(frame) = reader.next_stored_frame().unwrap() {
        frames += 1;
        assert!(frame.is_encrypted() && frame.is_compressed());
        assert_eq!(frame.header.key_id, 1);
        // Exactly the bytes on disk: nothing was re-encoded.
        assert!(
            files
                .iter()
                .any(|file| memchr::memmem::find(file, &frame.bytes).is_some()),
            "stored frame at {} is not on disk as handed out",
            frame.header.base_offset
        );
        // Clients have no key: the plain frame keeps its compressed body.
        let plain = reader.decrypt(frame.clone()).unwrap();
        assert!(!plain.is_encrypted() && plain.is_compressed());
        assert!(plain.bytes.len() < frame.bytes.len());
        assert!(memchr::memmem::find(&frame.bytes, MARKER.as_bytes()).is_none());
        let records = natswal::decode_frame_bytes(&plain.bytes, 1 << 20).unwrap();
        assert_eq!(records.len() as u32, plain.header.record_count);
        decoded.extend(records);
    }
    assert_eq!(
        frames, 19,
        "one frame per appended batch, from the one holding 150"
    );
    assert_eq!(
        decoded.first().unwrap().offset,
        101,
        "the frame holding offset 150"
    );
    let wanted: Vec<_> = decoded
        .into_iter()
        .filter(|record| record.offset >= start)
        .collect();
    assert_eq!(wanted.len(), expected.len() - (start as usize - 1));
    for record in &wanted {
        assert_record(record, &expected[index_of(record.offset)], record.offset);
    }
    drop(reader);
    // Bounds and damage are errors, never records.
    let mut reader = stream
        .reader(natswal::StartPosition::Earliest, None)
        .unwrap();
    let first = reader.next_stored_frame().unwrap().unwrap();
    let plain = reader.decrypt(first).unwrap();
    let error = natswal::decode_frame_bytes(&plain.bytes, 64).unwrap_err();
    assert!(error.contains("exceeds the limit"), "{error}");
    let mut damaged = plain.bytes.to_vec();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    let error = natswal::decode_frame_bytes(&damaged, 1 << 20).unwrap_err();
    assert!(error.contains("checksum"), "{error}");
    let error = natswal::decode_frame_bytes(&plain.bytes[..100], 1 << 20).unwrap_err();
    assert!(error.contains("only"), "{error}");
    drop(reader);
    stream.close().unwrap();
    drop(stream);
    // Without the key the frame is still handed on (replication ships it
    // as it is), but decrypting it names the missing key.
    let rotated = Some(EncryptionConfig {
        cipher: Cipher::Aes256Gcm,
        key_id: 2,
    });
    let stream = open_with(directory.path(), compression, rotated, vec![key(2)]).unwrap();
    let mut reader = stream
        .reader(natswal::StartPosition::Earliest, None)
        .unwrap();
    let frame = reader.next_stored_frame().unwrap().unwrap();
    assert_eq!(frame.header.key_id, 1);
    match reader.decrypt(frame) {
        Err(natswal::Error::KeyUnavailable { key_id: 1, .. }) => {}
        other => panic!("expected KeyUnavailable for key 1, got {other:?}"),
    }
}
