//! The storage contract under crashes at every step: the in-memory file
//! system crashes at its k-th mutating operation (for every k a full run
//! takes), is "powered off" (unsynced pages torn away at random), and the
//! stream reopens. Every entry whose flush callback reported success is
//! there, byte for byte; the log has no hole; the vote is the last saved
//! one (or the one whose save was cut off); the stream always reopens.

use natswal::io::memory::MemoryFileSystem;
use natswal::io::FileSystem;
mod common;

use natswal::{Log, StreamConfig};
use natswal_replication::types::{CommittedLeaderId, Entry, LogId, Membership, Node, Vote};
use natswal_replication::{Command, ProposedRecord, RecordBatch, StreamLogStore, StreamRaft};
use openraft::impls::leader_id_std::LeaderId;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::EntryPayload;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

const ROUNDS: u64 = 12;
const PER_ROUND: u64 = 3;

fn open(file_system: &Arc<dyn FileSystem>) -> natswal::Result<Log> {
    let config = StreamConfig {
        segment_bytes_max: 64 * 1024,
        record_bytes_max: 1024,
        frame_bytes_max: 4096,
        ..StreamConfig::default()
    };
    let options = common::log_options("crash", config);
    Log::open(Arc::clone(file_system), Path::new("/stream"), options).map(|(log, _)| log)
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term), index)
}

/// Entry `index`: records mostly, a membership and blanks among them.
fn entry(index: u64) -> Entry {
    let id = log_id(1 + index / 10, index);
    let payload = match index % 7 {
        0 => EntryPayload::Membership(
            Membership::new(
                vec![BTreeSet::from([1, 2, 3])],
                (1..=3)
                    .map(|id| {
                        let addr = format!("node-{id}:7222");
                        (id, Node { addr })
                    })
                    .collect::<BTreeMap<u64, Node>>(),
            )
            .unwrap(),
        ),
        3 => EntryPayload::Blank,
        _ => EntryPayload::Normal(Command::Records(RecordBatch {
            atomic: index % 2 == 0,
            records: (0..1 + index % 4)
                .map(|number| ProposedRecord {
                    timestamp_ns: 1_700_000_000_000_000_000 + index as i64,
                    subject: format!("orders.{index}").into(),
                    headers: Default::default(),
                    payload: vec![index as u8; (8 + number * 100) as usize].into(),
                })
                .collect(),
        })),
    };
    Entry {
        log_id: id,
        payload,
    }
}

fn vote(term: u64) -> Vote {
    Vote {
        leader_id: LeaderId {
            term,
            voted_for: 1 + term % 3,
        },
        committed: term % 2 == 0,
    }
}

struct Outcome {
    /// Entries whose flush reported success, as read back then.
    flushed: Vec<Entry>,
    saved_vote: Option<Vote>,
    attempted_vote: Option<Vote>,
}

/// Appends and saves votes until the file system fails (or all is done).
async fn run(memory: &MemoryFileSystem) -> Outcome {
    let file_system: Arc<dyn FileSystem> = Arc::new(memory.clone());
    let mut outcome = Outcome {
        flushed: Vec::new(),
        saved_vote: None,
        attempted_vote: None,
    };
    let Ok(log) = open(&file_system) else {
        return outcome;
    };
    let mut store = StreamLogStore::new(Arc::new(log));
    'rounds: for round in 0..ROUNDS {
        if round % 4 == 1 {
            let next = vote(round);
            outcome.attempted_vote = Some(next);
            if store.save_vote(&next).await.is_err() {
                break;
            }
            outcome.saved_vote = Some(next);
        }
        let first = round * PER_ROUND;
        let entries: Vec<Entry> = (first..first + PER_ROUND).map(entry).collect();
        let (sender, receiver) = StreamRaft::oneshot();
        if store
            .append(entries, IOFlushed::signal(sender))
            .await
            .is_err()
        {
            break 'rounds;
        }
        match receiver.await {
            Ok(Ok(())) => {}
            _ => break 'rounds,
        }
        match store.try_get_log_entries(first..first + PER_ROUND).await {
            Ok(read) => outcome.flushed.extend(read),
            Err(_) => break 'rounds,
        }
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_operation_keeps_every_flushed_entry_and_the_saved_vote() {
    let probe = MemoryFileSystem::new();
    let complete = run(&probe).await;
    assert_eq!(complete.flushed.len() as u64, ROUNDS * PER_ROUND);
    let operations = probe.operations();
    assert!(operations > 50, "a full run takes {operations} operations");
    let mut crashed_runs = 0;
    for crash_at in 1..=operations {
        let memory = MemoryFileSystem::with_seed(crash_at);
        memory.crash_after_operations(crash_at);
        let outcome = run(&memory).await;
        if memory.has_crashed() {
            crashed_runs += 1;
        }
        let after: Arc<dyn FileSystem> = Arc::new(memory.crash(crash_at));
        let log = match open(&after) {
            Ok(log) => log,
            Err(error) if outcome.flushed.is_empty() && outcome.saved_vote.is_none() => {
                // Nothing was acknowledged; the stream may not exist yet.
                assert!(
                    !after.exists(Path::new("/stream/00000000000000000001.log"))
                        || !error.to_string().is_empty()
                );
                continue;
            }
            Err(error) => {
                panic!("crash at operation {crash_at}: the stream does not reopen: {error}")
            }
        };
        let mut store = StreamLogStore::new(Arc::new(log));
        let state = store.get_log_state().await.unwrap();
        let flushed = outcome.flushed.len() as u64;
        if flushed > 0 {
            let last = state.last_log_id.expect("flushed entries survive");
            assert!(
                last.index + 1 >= flushed,
                "crash at operation {crash_at}: {flushed} entries flushed, the log ends at {last}"
            );
        }
        let read = store.try_get_log_entries(0..flushed).await.unwrap();
        assert_eq!(
            read, outcome.flushed,
            "crash at operation {crash_at}: flushed entries differ after the crash"
        );
        // No hole: everything up to the last entry reads.
        if let Some(last) = state.last_log_id {
            let all = store.try_get_log_entries(0..last.index + 1).await.unwrap();
            assert_eq!(all.len() as u64, last.index + 1);
        }
        let found = store.read_vote().await.unwrap();
        assert!(
            found == outcome.saved_vote || found == outcome.attempted_vote,
            "crash at operation {crash_at}: vote {found:?}, saved {:?}",
            outcome.saved_vote
        );
    }
    eprintln!("{operations} operations, {crashed_runs} runs crashed");
    assert!(
        crashed_runs as u64 >= operations - 1,
        "every run but the last crashed"
    );
}
