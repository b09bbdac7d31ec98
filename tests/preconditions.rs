//! Publish preconditions are checked by the writer in offset order: of
//! racing appends that expect the same last offset, exactly one is written.

mod common;

use common::*;
use natswal::{AppendRequest, Error, Precondition, PreconditionFailure, Record, FIRST_OFFSET};
use std::sync::Arc;

fn request(
    record: Record,
    preconditions: Vec<(u32, Precondition)>,
    id: Option<&str>,
) -> AppendRequest {
    AppendRequest {
        records: vec![record],
        preconditions,
        last_message_id: id.map(Arc::from),
        ..AppendRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_expected_last_offsets_let_exactly_one_win() {
    let directory = tempfile::tempdir().unwrap();
    let file_system = os_file_system();
    let stream = Arc::new(open(&file_system, directory.path(), small_config()).unwrap());
    for round in 0..500u64 {
        // An empty stream's last offset is 0.
        let last = FIRST_OFFSET - 1 + round;
        let contenders: Vec<_> = (0..3)
            .map(|contender| {
                let stream = Arc::clone(&stream);
                tokio::spawn(async move {
                    stream
                        .append_request(request(
                            Record::new(format!("race.{contender}"), format!("{round}")),
                            vec![(0, Precondition::ExpectedLastOffset(last))],
                            None,
                        ))
                        .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for contender in contenders {
            match contender.await.unwrap() {
                Ok(outcome) => winners.push(outcome.first_offset),
                Err(Error::PreconditionFailed(PreconditionFailure::WrongLastOffset {
                    expected,
                    last: actual,
                })) => {
                    assert_eq!(expected, last);
                    assert_eq!(actual, last + 1, "the loser sees the winner's offset");
                }
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        assert_eq!(winners, vec![last + 1], "round {round}: exactly one wins");
    }
    let stored = read_all(&stream).unwrap();
    assert_eq!(stored.len(), 500, "no gap, no duplicate");
    for (index, record) in stored.iter().enumerate() {
        assert_eq!(record.offset, FIRST_OFFSET + index as u64);
        assert_eq!(record.payload, index.to_string());
    }
}

#[tokio::test]
async fn expected_last_message_id_tracks_the_last_written_record() {
    let directory = tempfile::tempdir().unwrap();
    let file_system = os_file_system();
    let stream = open(&file_system, directory.path(), small_config()).unwrap();
    stream
        .append_request(request(Record::new("a", "1"), Vec::new(), Some("id-1")))
        .await
        .unwrap();
    let expect = |id: &str| vec![(0, Precondition::ExpectedLastMessageId(id.to_string()))];
    let wrong = stream
        .append_request(request(Record::new("a", "x"), expect("nope"), None))
        .await;
    match wrong {
        Err(Error::PreconditionFailed(PreconditionFailure::WrongLastMessageId {
            last, ..
        })) => {
            assert_eq!(last.as_deref(), Some("id-1"));
        }
        other => panic!("expected a wrong last id, got {other:?}"),
    }
    stream
        .append_request(request(Record::new("a", "2"), expect("id-1"), None))
        .await
        .unwrap();
    // The last record now has no id: nothing matches "id-1" any more.
    let stale = stream
        .append_request(request(Record::new("a", "y"), expect("id-1"), None))
        .await;
    assert!(
        matches!(stale, Err(Error::PreconditionFailed(_))),
        "{stale:?}"
    );
    assert_eq!(read_all(&stream).unwrap().len(), 2);
}

#[tokio::test]
async fn a_failed_precondition_inside_an_atomic_batch_stores_nothing_of_it() {
    let directory = tempfile::tempdir().unwrap();
    let file_system = os_file_system();
    let stream = open(&file_system, directory.path(), small_config()).unwrap();
    stream.append(Record::new("a", "0")).await.unwrap();
    let batch = |expected_before_second: u64| AppendRequest {
        records: vec![
            Record::new("b", "1"),
            Record::new("b", "2"),
            Record::new("b", "3"),
        ],
        atomic: true,
        // Record 1 expects record 0 of the batch right before it.
        preconditions: vec![(1, Precondition::ExpectedLastOffset(expected_before_second))],
        ..AppendRequest::default()
    };
    let failed = stream.append_request(batch(FIRST_OFFSET)).await;
    assert!(
        matches!(failed, Err(Error::PreconditionFailed(_))),
        "{failed:?}"
    );
    assert_eq!(
        read_all(&stream).unwrap().len(),
        1,
        "nothing of the failed batch"
    );
    let outcome = stream
        .append_request(batch(FIRST_OFFSET + 1))
        .await
        .unwrap();
    assert_eq!((outcome.first_offset, outcome.count), (FIRST_OFFSET + 1, 3));
    assert_eq!(read_all(&stream).unwrap().len(), 4);
}
