//! Replay's three modes over a compressed, encrypted stream: frames mode
//! hands stored frames on (decrypted, still compressed, never re-encoded)
//! and the `natswal replay` CLI prints the same records in every mode.

mod support;

use bytes::Bytes;
use serde_json::json;
use std::path::Path;
use support::*;

/// Flags of a frame (docs/FORMAT.md 2.2: u16 at byte 14).
/// Flags of a frame (FORMAT.md 2.2: bytes 64..66 of the header).
fn frame_flags(frame: &[u8]) -> u16 {
    u16::from_le_bytes([frame[64], frame[65]])
}
const FLAG_ZSTD: u16 = 1;
const FLAG_ENCRYPTED: u16 = 1 << 2;

async fn start_encrypted(nats: &NatsServer, data: &Path) -> Natswal {
    let key = data.join("1.key");
    std::fs::write(&key, "5a".repeat(32)).unwrap();
    let config = format!(
        "[[keys]]\nid = 1\nfile = \"{}\"\n[[streams]]\nname = \"events\"\nsubjects = [\"events.>\"]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nencryption_key_id = 1\n",
        key.display()
    );
    Natswal::start(&nats.url(), &data.join("data"), &config)
}

/// Publishes `count` JSON events (some with headers), in order; returns
/// once all are stored.
async fn publish_events(client: &async_nats::Client, count: usize) {
    for index in 0..count {
        let payload = Bytes::from(format!(
            "{{\"index\":{index},\"kind\":\"order.created\",\"customer\":\"c-{}\"}}",
            index % 17
        ));
        let subject = format!("events.{}.created", ["eu", "us", "ap"][index % 3]);
        if index % 5 == 0 {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Trace-Id", format!("t-{index}").as_str());
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .unwrap();
        } else {
            client.publish(subject, payload).await.unwrap();
        }
    }
    // Ingest is ordered: once this one is acknowledged, all are stored.
    let ack = client
        .request("events.last", Bytes::from_static(b"{\"last\":true}"))
        .await
        .unwrap();
    let ack: serde_json::Value = serde_json::from_slice(&ack.payload).unwrap();
    assert_eq!(ack["seq"], count as u64 + 1, "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_mode_hands_on_stored_frames_decrypted_but_still_compressed() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = start_encrypted(&nats, data.path()).await;
    let client = connect(&nats.url()).await;
    publish_events(&client, 3000).await;

    let per_record = replay_all(&client, "events", json!({"batch": 5000})).await;
    assert_eq!(per_record.len(), 3001);
    let response = replay_once(
        &client,
        "events",
        json!({"mode": "frames", "batch": 100000}),
    )
    .await;
    assert_eq!(response.status, 100, "{}", response.description);
    assert_eq!(response.next_offset, Some(3002));
    let caught_up = replay_once(
        &client,
        "events",
        json!({"mode": "frames", "start": {"offset": 3002}}),
    )
    .await;
    assert_eq!(caught_up.status, 404);
    assert!(caught_up.frames.is_empty());
    assert!(!response.frames.is_empty());
    for frame in &response.frames {
        assert_eq!(
            frame_flags(frame) & FLAG_ENCRYPTED,
            0,
            "clients get decrypted frames"
        );
    }
    assert!(
        response
            .frames
            .iter()
            .any(|frame| frame_flags(frame) & FLAG_ZSTD != 0),
        "compressed frames stay compressed on the wire"
    );
    let wire_bytes: usize = response.frames.iter().map(Bytes::len).sum();
    let payload_bytes: usize = per_record.iter().map(|record| record.payload.len()).sum();
    assert!(
        wire_bytes < payload_bytes,
        "{wire_bytes} frame bytes for {payload_bytes} payload bytes"
    );
    assert_eq!(
        response.records, per_record,
        "same records as messages mode"
    );

    // The first frame may begin before the start; nothing is missing.
    let middle = replay_once(
        &client,
        "events",
        json!({"mode": "frames", "start": {"offset": 1500}, "batch": 1}),
    )
    .await;
    assert_eq!(middle.status, 100);
    assert_eq!(middle.frames.len(), 1, "at least one whole frame, no more");
    let first = middle.records.first().unwrap().offset;
    let last = middle.records.last().unwrap().offset;
    assert!(first <= 1500 && 1500 <= last, "{first}..{last}");
    assert_eq!(middle.next_offset, Some(last + 1));

    // A limit counts the records from the start on, not the whole first
    // frame: a start inside a frame still gets `limit` records.
    let (base, count) = response
        .frames
        .iter()
        .map(|frame| {
            let records = natswal::decode_frame_bytes(frame, usize::MAX).unwrap();
            (records[0].offset, records.len() as u64)
        })
        .find(|&(_, count)| count >= 2)
        .expect("3 000 quick publishes were batched into frames of several records");
    let limit = count; // the rest of this frame (count - 1) and one more
    let from_inside = replay_once(
        &client,
        "events",
        json!({"mode": "frames", "start": {"offset": base + 1}, "limit": limit, "batch": 100000}),
    )
    .await;
    let asked_for = from_inside
        .records
        .iter()
        .filter(|record| record.offset > base)
        .count() as u64;
    assert!(
        asked_for >= limit,
        "from offset {} (inside a frame of {count} at {base}) with limit {limit}: {asked_for} records ({})",
        base + 1,
        from_inside.description
    );

    // Frames cannot be filtered.
    let filtered = replay_once(
        &client,
        "events",
        json!({"mode": "frames", "filter": "events.eu.*"}),
    )
    .await;
    assert_eq!(filtered.status, 400);
    assert!(
        filtered.description.contains("cannot filter"),
        "{}",
        filtered.description
    );
}

fn cli_replay(nats_url: &str, extra: &[&str]) -> Vec<String> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
        .args(["replay", "events", "--nats-url", nats_url])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "natswal replay {extra:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_cli_prints_the_same_records_in_every_mode() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = start_encrypted(&nats, data.path()).await;
    let client = connect(&nats.url()).await;
    publish_events(&client, 3000).await;
    let url = nats.url();
    let range = [
        "--from-offset",
        "150",
        "--to-offset",
        "2500",
        "--batch",
        "300",
    ];
    let messages = cli_replay(&url, &range);
    assert_eq!(messages.len(), 2351);
    let first: serde_json::Value = serde_json::from_str(&messages[0]).unwrap();
    assert_eq!(first["offset"], 150);
    assert_eq!(
        first["payload"],
        "{\"index\":149,\"kind\":\"order.created\",\"customer\":\"c-13\"}"
    );
    assert_eq!(first["headers"], json!({}));
    let second: serde_json::Value = serde_json::from_str(&messages[1]).unwrap();
    assert_eq!(second["headers"]["Trace-Id"], json!(["t-150"]));
    let last: serde_json::Value = serde_json::from_str(messages.last().unwrap()).unwrap();
    assert_eq!(last["offset"], 2500);
    for mode in ["--batched", "--frames", "--light"] {
        let mut arguments = range.to_vec();
        arguments.push(mode);
        assert_eq!(cli_replay(&url, &arguments), messages, "{mode}");
    }
    // The limit and a time start trim whole frames too.
    let limited = cli_replay(
        &url,
        &["--from-offset", "150", "--limit", "100", "--frames"],
    );
    assert_eq!(limited, messages[..100].to_vec());
    let middle: serde_json::Value = serde_json::from_str(&messages[1000]).unwrap();
    let time = middle["timestamp_ns"].as_i64().unwrap().to_string();
    let by_time = ["--from-time", time.as_str(), "--limit", "50"];
    let expected = cli_replay(&url, &by_time);
    assert_eq!(expected.len(), 50);
    assert!(expected[0].contains("\"timestamp_ns\":"));
    let mut frames = by_time.to_vec();
    frames.push("--frames");
    assert_eq!(cli_replay(&url, &frames), expected);
    let with_headers: Vec<&String> = messages
        .iter()
        .filter(|line| line.contains("Trace-Id"))
        .collect();
    assert_eq!(
        with_headers.len(),
        470,
        "every fifth event carries a header"
    );
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
        .args([
            "replay",
            "events",
            "--nats-url",
            &url,
            "--frames",
            "--filter",
            "events.eu.*",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--filter"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_larger_than_the_max_payload_travels_as_records() {
    let nats = NatsServer::start_with_config(Some("max_payload: 65536\n".to_string()));
    let data = tempfile::tempdir().unwrap();
    let config = "[[streams]]\nname = \"events\"\nsubjects = [\"events.>\"]\nallow_atomic = true\n";
    let _natswal = Natswal::start(&nats.url(), data.path(), config);
    let client = connect(&nats.url()).await;
    // One atomic batch is one frame: 30 x 4 KiB is about twice the max payload.
    let count = 30;
    for sequence in 1..=count {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Batch-Id", "big");
        headers.insert("Nats-Batch-Sequence", sequence.to_string().as_str());
        if sequence == count {
            headers.insert("Nats-Batch-Commit", "1");
        }
        let payload = Bytes::from(vec![b'a' + (sequence % 26) as u8; 4096]);
        if sequence == 1 || sequence == count {
            let ack = client
                .request_with_headers("events.big", headers, payload)
                .await
                .unwrap();
            if sequence == count {
                let ack: serde_json::Value = serde_json::from_slice(&ack.payload).unwrap();
                assert_eq!(ack["batch"], "big", "{ack}");
            }
        } else {
            client
                .publish_with_headers("events.big", headers, payload)
                .await
                .unwrap();
        }
    }
    let response = replay_once(&client, "events", json!({"mode": "frames"})).await;
    assert_eq!(response.status, 100, "{}", response.description);
    assert!(
        response.frames.is_empty(),
        "the frame does not fit one message"
    );
    assert_eq!(response.records.len(), count);
    for (index, record) in response.records.iter().enumerate() {
        assert_eq!(record.offset, index as u64 + 1);
        assert_eq!(record.payload.len(), 4096);
        assert_eq!(record.payload[0], b'a' + ((index + 1) % 26) as u8);
    }
}

/// A raw protocol client: sends one `HPUB` (or `PUB` without headers)
/// with exactly the given header block (no client library reorders or
/// re-encodes it) and returns the first `replies` messages on its inbox
/// as (header block, payload), byte for byte.
fn raw_request(
    url: &str,
    subject: &str,
    headers: &[u8],
    payload: &[u8],
    replies: usize,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let address = url.trim_start_matches("nats://");
    let stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("INFO"), "{line}");
    let mut command = Vec::new();
    command.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"headers\":true,\"protocol\":1}\r\nSUB raw.inbox 1\r\n",
    );
    let operation = if headers.is_empty() {
        format!("PUB {subject} raw.inbox {}\r\n", payload.len())
    } else {
        format!(
            "HPUB {subject} raw.inbox {} {}\r\n",
            headers.len(),
            headers.len() + payload.len()
        )
    };
    command.extend_from_slice(operation.as_bytes());
    command.extend_from_slice(headers);
    command.extend_from_slice(payload);
    command.extend_from_slice(b"\r\n");
    writer.write_all(&command).unwrap();
    let mut received = Vec::new();
    while received.len() < replies {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("PING") {
            writer.write_all(b"PONG\r\n").unwrap();
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |index: usize| words[words.len() - index].parse::<usize>().unwrap();
        let (header_size, total) = match words.first() {
            Some(&"MSG") => (0, number(1)),
            Some(&"HMSG") => (number(2), number(1)),
            _ => {
                assert!(
                    line.starts_with("+OK") || line.starts_with("INFO"),
                    "unexpected: {line}"
                );
                continue;
            }
        };
        let mut body = vec![0; total + 2];
        reader.read_exact(&mut body).unwrap();
        body.truncate(total);
        let payload = body.split_off(header_size);
        received.push((body, payload));
    }
    received
}

/// [`raw_request`] for a publish: the ack's text.
fn raw_publish(url: &str, subject: &str, headers: &[u8], payload: &[u8]) -> String {
    let mut replies = raw_request(url, subject, headers, payload, 1);
    String::from_utf8(replies.remove(0).1).unwrap()
}

/// natswal stores a header block byte for byte as the publisher sent it
/// (order, repeated names, spacing), and frames and messages modes hand it
/// back so; a block that cannot be replayed is refused, naming the
/// problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_stored_exactly_as_received() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), "");
    let sent: &[u8] =
        b"NATS/1.0\r\nZ-Last: 1\r\nNats-Msg-Id: raw-1\r\nA-First:  two spaces\r\nZ-Last: 3\r\n\r\n";
    let url = nats.url();
    let ack = tokio::task::spawn_blocking(move || raw_publish(&url, "events.raw", sent, b"body"))
        .await
        .unwrap();
    assert_eq!(ack, "{\"stream\":\"events\",\"seq\":1}");
    let url = nats.url();
    let refused = tokio::task::spawn_blocking(move || {
        raw_publish(
            &url,
            "events.raw",
            b"NATS/1.0\r\nNo-Colon-Here\r\n\r\n",
            b"x",
        )
    })
    .await
    .unwrap();
    assert!(
        refused.contains("10003") && refused.contains("'No-Colon-Here' has no ':'"),
        "{refused}"
    );
    let client = connect(&nats.url()).await;
    let response = replay_once(&client, "events", json!({"mode": "frames"})).await;
    let records: Vec<natswal::StoredRecord> = response
        .frames
        .iter()
        .flat_map(|frame| natswal::decode_frame_bytes(frame, usize::MAX).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "the refused message is not stored");
    assert_eq!(&records[0].headers[..], sent);
    assert_eq!(&records[0].payload[..], b"body");
    // The id in the block deduplicates as any other.
    let url = nats.url();
    let again = tokio::task::spawn_blocking(move || raw_publish(&url, "events.raw", sent, b"body"))
        .await
        .unwrap();
    assert_eq!(
        again,
        "{\"stream\":\"events\",\"seq\":1,\"duplicate\":true}"
    );
    // Messages mode: the stored lines in order, then replay's own.
    let url = nats.url();
    let replayed = tokio::task::spawn_blocking(move || {
        raw_request(&url, "$NWAL.REPLAY.events", b"", b"{\"batch\":1}", 2)
    })
    .await
    .unwrap();
    let (record_headers, payload) = &replayed[0];
    assert_eq!(&payload[..], b"body");
    let stored_lines = &sent[..sent.len() - 2];
    assert!(
        record_headers.starts_with(stored_lines),
        "{:?}",
        String::from_utf8_lossy(record_headers)
    );
    let added = String::from_utf8_lossy(&record_headers[stored_lines.len()..]).to_string();
    assert!(
        added.starts_with("Nwal-Stream: events\r\nNwal-Subject: events.raw\r\nNwal-Offset: 1\r\n"),
        "{added:?}"
    );
    let status = String::from_utf8_lossy(&replayed[1].0).to_string();
    assert!(status.contains("Nwal-Status: 100"), "{status}");
}
