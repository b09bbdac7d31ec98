//! Damage as a user meets it, on a stream of 256 KiB segments written
//! through nats-server with every message acknowledged at `fsync`: each
//! case must cost at most the damaged frame (or the bytes that are gone),
//! never go unreported, and an explicit `natswal repair` must move exactly
//! those bytes to `quarantine/` and leave a stream that verifies and opens,
//! with every other acknowledged record and the offsets going on after the
//! lost ones. A truncation killed at any of its file-system calls leaves
//! the old stream or the new one.
//!
//! `NATSWAL_BIN=<an older natswal>` runs the same cases against another
//! build.

mod support;

use bytes::Bytes;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use support::*;

const CONFIG: &str =
    "[[streams]]\nname = \"events\"\nsubjects = [\"events.>\"]\nsegment_bytes = \"256KiB\"\nmax_message_bytes = \"64KiB\"\n";
const RECORDS: usize = 20_000;

/// A stream written through NATS, every record acknowledged, then stopped
/// cleanly.
struct Stopped {
    nats: NatsServer,
    data: tempfile::TempDir,
    acked: BTreeMap<u64, Bytes>,
}

impl Stopped {
    fn stream_directory(&self) -> PathBuf {
        self.data.path().join("streams").join("events")
    }
}

async fn written_and_stopped() -> Stopped {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut natswal = Natswal::start(&nats.url(), data.path(), CONFIG);
    let client = connect(&nats.url()).await;
    let acked = publish_acked(&client, RECORDS, 0).await;
    assert_eq!(acked.len(), RECORDS);
    assert!(natswal.terminate().success(), "a clean stop");
    Stopped { nats, data, acked }
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().to_string()
}

/// Replays from the start until the end or an error status: the records,
/// then the error's status and description if one came.
async fn replay_until_error(client: &async_nats::Client) -> (Vec<Replayed>, Option<(u16, String)>) {
    let mut records = Vec::new();
    let mut request = json!({"batch": 10_000});
    for _ in 0..10_000 {
        let response = replay_once(client, "events", request.clone()).await;
        records.extend(response.records);
        match response.status {
            100 => request["start"] = json!({"offset": response.next_offset.unwrap()}),
            204 | 404 => return (records, None),
            status => return (records, Some((status, response.description))),
        }
    }
    panic!("replay did not end");
}

/// The acknowledged records without `lost`, as offsets and payloads.
fn expected_without(acked: &BTreeMap<u64, Bytes>, lost: &[u64]) -> Vec<(u64, Bytes)> {
    acked
        .iter()
        .filter(|(offset, _)| !lost.contains(offset))
        .map(|(offset, payload)| (*offset, payload.clone()))
        .collect()
}

fn offsets_and_payloads(records: &[Replayed]) -> Vec<(u64, Bytes)> {
    records
        .iter()
        .map(|record| (record.offset, record.payload.clone()))
        .collect()
}

/// What every damage case must end in: `verify` names the damage, `repair`
/// moves exactly `[position, position + quarantined_bytes)` of `victim` to
/// quarantine and reports `lost` as lost offsets, then the stream verifies,
/// a second repair finds nothing, serve replays every other acknowledged
/// record, and new records get offsets after the old ones.
async fn repaired_losing_only(
    stopped: &Stopped,
    victim: &Path,
    position: u64,
    quarantined_bytes: u64,
    lost: &[u64],
) {
    let directory = stopped.stream_directory();
    let directory_text = directory.display().to_string();
    let (code, output) = natswal_run(&["verify", &directory_text]);
    assert_eq!(code, 1, "verify reports the damage:\n{output}");
    assert!(
        output.contains(&file_name(victim)) && output.contains("DAMAGED"),
        "{output}"
    );
    assert!(
        !output.contains("torn tail"),
        "damage to acknowledged data is not a torn tail:\n{output}"
    );

    let (code, output) = natswal_run(&["repair", &directory_text]);
    assert_eq!(code, 0, "repair:\n{output}");
    let first_lost = lost.first().copied().unwrap();
    let next_kept = lost.last().copied().unwrap() + 1;
    assert!(
        output.contains(&format!("lost offsets {first_lost}..{next_kept}")),
        "repair reports exactly the lost offsets {first_lost}..{next_kept}:\n{output}"
    );
    let quarantine = directory.join("quarantine");
    let saved: Vec<PathBuf> = std::fs::read_dir(&quarantine)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "bin"))
        .collect();
    assert_eq!(saved.len(), 1, "one damaged range: {saved:?}\n{output}");
    let expected_name = format!(
        "{}.at-{position}-{}.bin",
        file_name(victim),
        position + quarantined_bytes
    );
    assert_eq!(file_name(&saved[0]), expected_name, "{output}");

    let (code, output) = natswal_run(&["verify", &directory_text]);
    assert_eq!(code, 0, "the repaired stream verifies:\n{output}");
    let (code, output) = natswal_run(&["repair", &directory_text]);
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("nothing to repair"),
        "a second repair finds nothing (no stale index):\n{output}"
    );

    let _natswal = Natswal::start(&stopped.nats.url(), stopped.data.path(), CONFIG);
    let client = connect(&stopped.nats.url()).await;
    let (records, error) = replay_until_error(&client).await;
    assert!(error.is_none(), "{error:?}");
    let expected = expected_without(&stopped.acked, lost);
    assert_eq!(
        records.len(),
        expected.len(),
        "every acknowledged record but the {} lost ones",
        lost.len()
    );
    assert!(
        offsets_and_payloads(&records) == expected,
        "records differ from what was acknowledged"
    );
    let next = *stopped.acked.keys().last().unwrap() + 1;
    let more = publish_acked(&client, 1, RECORDS).await;
    assert_eq!(
        more.keys().next(),
        Some(&next),
        "offsets go on after the lost ones"
    );
}

fn cut_to(path: &Path, length: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(length)
        .unwrap();
}

fn offsets_of(span: &FrameSpan) -> Vec<u64> {
    (span.base_offset..span.base_offset + u64::from(span.record_count)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_bytes_cut_from_a_sealed_segment_cost_only_its_last_frame() {
    let stopped = written_and_stopped().await;
    let segments = segment_files(&stopped.stream_directory());
    assert!(segments.len() >= 6, "{} segments", segments.len());
    let victim = segments[segments.len() / 2].clone();
    let bytes = std::fs::read(&victim).unwrap();
    let last = *frame_spans(&bytes).last().unwrap();
    assert_eq!(
        last.end as usize,
        bytes.len(),
        "a sealed segment ends with its last frame"
    );
    cut_to(&victim, bytes.len() as u64 - 5);
    let refused = Natswal::try_start(&stopped.nats.url(), stopped.data.path(), CONFIG)
        .err()
        .expect("serve refuses a stream whose acknowledged records were cut");
    assert!(
        refused.contains(&file_name(&victim)) && refused.contains("natswal repair"),
        "{refused}"
    );
    let remaining = last.end - 5 - last.start;
    repaired_losing_only(&stopped, &victim, last.start, remaining, &offsets_of(&last)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flipped_byte_in_a_sealed_segment_costs_only_its_frame() {
    let stopped = written_and_stopped().await;
    let segments = segment_files(&stopped.stream_directory());
    let victim = segments[segments.len() / 2].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let spans = frame_spans(&bytes);
    let damaged = spans[spans.len() / 2];
    let middle = (damaged.start + 16 + 96 + (damaged.end - damaged.start - 112) / 2) as usize;
    bytes[middle] ^= 0x10;
    std::fs::write(&victim, &bytes).unwrap();
    // Sealed segments are trusted through their index on open and checked
    // on read. Serve reads the recent records back at start (deduplication
    // ids), so it meets the damage there and refuses, naming it; had the
    // damage been older, a replay would meet it and report it.
    let description = match Natswal::try_start(&stopped.nats.url(), stopped.data.path(), CONFIG) {
        Err(refused) => refused,
        Ok(_natswal) => {
            let client = connect(&stopped.nats.url()).await;
            let (records, error) = replay_until_error(&client).await;
            let (status, description) = error.expect("the damaged frame is reported, not skipped");
            assert!(status >= 500, "{status} {description}");
            assert!(records
                .last()
                .is_none_or(|record| record.offset < damaged.base_offset));
            description
        }
    };
    assert!(
        description.contains(&file_name(&victim))
            && description.contains(&format!("byte {}", damaged.start)),
        "{description}"
    );
    repaired_losing_only(
        &stopped,
        &victim,
        damaged.start,
        damaged.end - damaged.start,
        &offsets_of(&damaged),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroed_end_of_the_active_segment_after_a_clean_stop_is_damage_not_a_torn_tail() {
    let stopped = written_and_stopped().await;
    let active = segment_files(&stopped.stream_directory()).pop().unwrap();
    let mut bytes = std::fs::read(&active).unwrap();
    let last = *frame_spans(&bytes).last().unwrap();
    bytes[last.end as usize - 5..last.end as usize].fill(0);
    std::fs::write(&active, &bytes).unwrap();
    repaired_losing_only(
        &stopped,
        &active,
        last.start,
        last.end - last.start,
        &offsets_of(&last),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_segment_cut_while_serving_is_an_error_not_sigbus() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut natswal = Natswal::start(&nats.url(), data.path(), CONFIG);
    let client = connect(&nats.url()).await;
    let acked = publish_acked(&client, RECORDS, 0).await;
    let directory = data.path().join("streams").join("events");
    let segments = segment_files(&directory);
    let victim = segments[segments.len() / 2].clone();
    let victim_base: u64 = victim
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    let next_base: u64 = segments[segments.len() / 2 + 1]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    cut_to(&victim, 100);
    let (records, error) = replay_until_error(&client).await;
    let (status, description) = error.expect("the cut segment is reported");
    assert!(status >= 500, "{status} {description}");
    assert!(description.contains(&file_name(&victim)), "{description}");
    assert!(records.iter().all(|record| record.offset < victim_base));
    // The server lives on: it still acknowledges, serves what is intact,
    // and reports itself healthy.
    let (code, _) = natswal.http_get("/healthz");
    assert_eq!(code, 200);
    let more = publish_acked(&client, 10, RECORDS).await;
    assert_eq!(more.len(), 10);
    let after = replay_once(
        &client,
        "events",
        json!({"start": {"offset": next_base}, "batch": 10}),
    )
    .await;
    assert_eq!(
        after.records.first().map(|record| record.offset),
        Some(next_base)
    );
    assert!(natswal.terminate().success());
    drop(natswal);
    let mut acked = acked;
    acked.extend(more);
    let stopped = Stopped { nats, data, acked };
    let refused = Natswal::try_start(&stopped.nats.url(), stopped.data.path(), CONFIG)
        .err()
        .expect("serve refuses the cut segment after a restart");
    assert!(refused.contains(&file_name(&victim)), "{refused}");
    let lost: Vec<u64> = (victim_base..next_base).collect();
    repaired_losing_only(&stopped, &victim, 64, 36, &lost).await;
}

/// Counts the calls of each syscall `natswal ARGS` makes.
fn syscall_counts(syscalls: &[&str], args: &[&str]) -> BTreeMap<String, u64> {
    let trace = tempfile::NamedTempFile::new().unwrap();
    let status = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(trace.path())
        .arg("-e")
        .arg(format!("trace={}", syscalls.join(",")))
        .arg(natswal_binary())
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("strace runs (scripts/setup installs it)");
    assert!(status.success(), "the traced run succeeds");
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(trace.path()).unwrap().lines() {
        let call = line.split_whitespace().nth(1).unwrap_or("");
        if let Some(name) = call.split('(').next() {
            if syscalls.contains(&name) {
                *counts.entry(name.to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// Offsets and payloads of every record of a stream directory, read with
/// the engine as an open after a crash would.
fn read_stream(directory: &Path) -> natswal::Result<Vec<(u64, Bytes)>> {
    let file_system: std::sync::Arc<dyn natswal::io::FileSystem> =
        std::sync::Arc::new(natswal::io::os::OsFileSystem::default());
    let (stream, _) = natswal::Stream::open(
        file_system,
        directory,
        "events",
        std::sync::Arc::new(natswal::SegmentCache::new(16)),
        natswal::StreamOptions {
            config: natswal::StreamConfig {
                segment_bytes_max: 256 * 1024,
                record_bytes_max: 64 * 1024,
                frame_bytes_max: 128 * 1024,
                ..natswal::StreamConfig::default()
            },
            ..natswal::StreamOptions::default()
        },
    )?;
    let mut reader = stream.reader(natswal::StartPosition::Earliest, None)?;
    let mut records = Vec::new();
    while let Some(record) = reader.next()? {
        records.push((record.offset, record.payload));
    }
    stream.close()?;
    Ok(records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_killed_at_any_file_system_call_leaves_the_old_or_the_new_stream() {
    let stopped = written_and_stopped().await;
    let source = stopped.stream_directory();
    let segments = segment_files(&source);
    // A cut inside a frame of records in a middle segment: later segments
    // go, that segment is cut and the records before it in the frame are
    // written back.
    let boundary = &segments[segments.len() / 2];
    let spans = frame_spans(&std::fs::read(boundary).unwrap());
    let straddling = spans
        .iter()
        .find(|span| span.record_count >= 2)
        .expect("a frame of several records");
    let from_offset = straddling.base_offset + 1;
    let old = expected_without(&stopped.acked, &[]);
    let new: Vec<(u64, Bytes)> = old
        .iter()
        .filter(|(offset, _)| *offset < from_offset)
        .cloned()
        .collect();
    let syscalls = [
        "openat",
        "write",
        "pwrite64",
        "pwritev",
        "fsync",
        "fdatasync",
        "rename",
        "renameat2",
        "unlink",
        "unlinkat",
        "ftruncate",
        "fallocate",
        "mkdir",
    ];
    let from_text = from_offset.to_string();
    let trial_root = tempfile::tempdir().unwrap();
    let trial = trial_root.path().join("streams").join("events");
    let copy = || {
        let _ = std::fs::remove_dir_all(trial_root.path());
        copy_tree(&source, &trial);
    };
    copy();
    let counts = syscall_counts(
        &syscalls,
        &[
            "truncate",
            &trial.display().to_string(),
            "--from-offset",
            &from_text,
        ],
    );
    assert!(counts.values().sum::<u64>() > 20, "{counts:?}");
    let (mut killed, mut ended_old, mut ended_new) = (0, 0, 0);
    for (syscall, count) in &counts {
        for when in 1..=*count {
            copy();
            let status = std::process::Command::new("strace")
                .args(["-f", "-qq", "-o", "/dev/null"])
                .arg("-e")
                .arg(format!("inject={syscall}:signal=KILL:when={when}"))
                .arg(natswal_binary())
                .args([
                    "truncate",
                    &trial.display().to_string(),
                    "--from-offset",
                    &from_text,
                ])
                .env("RUST_LOG", "error")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            if !status.success() {
                killed += 1;
            }
            let records = read_stream(&trial).unwrap_or_else(|error| {
                panic!("killed at {syscall} call {when}: the stream does not open: {error}")
            });
            if records == old {
                ended_old += 1;
            } else if records == new {
                ended_new += 1;
            } else {
                panic!(
                    "killed at {syscall} call {when}: neither the old stream ({} records) nor the new one ({}): {} records",
                    old.len(),
                    new.len(),
                    records.len()
                );
            }
        }
    }
    eprintln!("syscalls {counts:?}: {killed} runs killed, {ended_old} ended old, {ended_new} new");
    assert!(killed > 20, "{killed} runs killed of {counts:?}");
    assert!(
        ended_old > 0 && ended_new > 0,
        "old {ended_old}, new {ended_new}"
    );
}

fn copy_tree(source: &Path, target: &Path) {
    std::fs::create_dir_all(target).unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&path, &target.join(entry.file_name()));
        } else if entry.file_name() != "LOCK" {
            std::fs::copy(&path, target.join(entry.file_name())).unwrap();
        }
    }
}
