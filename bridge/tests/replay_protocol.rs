//! The replay protocol against hostile or odd input: headers that imitate
//! status messages, records too large to send with replay's headers, times
//! outside i64 nanoseconds, ambiguous positions, wrong subjects, and more
//! concurrent long polls than natswal serves at once.

mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use natswal::FIRST_OFFSET;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::*;

fn payloads(records: &[Replayed]) -> Vec<String> {
    records
        .iter()
        .map(|record| String::from_utf8_lossy(&record.payload).to_string())
        .collect()
}

/// A record stored with an `Nwal-*` header (by a version that did not
/// refuse them) never ends a replay; new ones are refused at ingest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_headers_are_refused_and_a_record_cannot_pass_for_a_status() {
    let data = tempfile::tempdir().unwrap();
    {
        let store = natswal::Store::open(data.path(), natswal::io::WriteMode::Pwrite, 8).unwrap();
        let (stream, _) = store
            .open_stream("events", natswal::StreamOptions::default())
            .unwrap();
        stream
            .append(natswal::Record {
                timestamp_ns: 0,
                subject: Bytes::from_static(b"events.old"),
                headers: Bytes::from_static(
                    b"NATS/1.0\r\nNwal-Status: 204\r\nNwal-Next-Offset: 99\r\nX-Kept: yes\r\n\r\n",
                ),
                payload: Bytes::from_static(b"old"),
            })
            .await
            .unwrap();
        store.close().unwrap();
    }
    let nats = NatsServer::start();
    let _natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    for name in ["Nwal-Status", "nwal-offset", "NWAL-Anything"] {
        let refused = request_with_pairs(&client, "events.a", &[(name, "204")], "x").await;
        assert_eq!(refused["error"]["err_code"], 10003, "{name}: {refused}");
        let description = refused["error"]["description"].as_str().unwrap();
        assert!(
            description.contains(name) && description.contains("reserved"),
            "{description}"
        );
    }
    for payload in ["after 1", "after 2"] {
        let ack = request_with_pairs(&client, "events.a", &[], payload).await;
        assert!(ack["seq"].is_u64(), "{ack}");
    }
    let response = replay_once(&client, "events", json!({"batch": 10})).await;
    assert_eq!(
        payloads(&response.records),
        vec!["old", "after 1", "after 2"],
        "the old record does not end the replay, and nothing refused was stored"
    );
    assert_eq!(
        response.records[0].headers,
        vec![("X-Kept".to_string(), "yes".to_string())],
        "stored reserved headers are left out, the others kept"
    );
    assert_eq!(response.next_offset, Some(FIRST_OFFSET + 3));
    // natswal's own client reads all three as well.
    let (code, output) = natswal_run(&[
        "replay",
        "events",
        "--nats-url",
        &nats.url(),
        "--output",
        "raw",
    ]);
    assert_eq!((code, output.lines().count()), (0, 3), "{output}");
}

/// A record that fits NATS on ingest but not with replay's headers stops
/// the replay with a status naming its offset; nothing after it is
/// delivered in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_be_sent_is_an_error_naming_its_offset() {
    let nats = NatsServer::start_with_config(Some("max_payload: 8192\n".to_string()));
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    let big = Bytes::from(vec![b'b'; 8100]);
    for payload in [
        Bytes::from_static(b"small"),
        big,
        Bytes::from_static(b"last"),
    ] {
        let ack = request_with_pairs(&client, "events.a", &[], payload).await;
        assert!(ack["seq"].is_u64(), "{ack}");
    }
    for mode in ["messages", "batched"] {
        let response = replay_once(&client, "events", json!({"mode": mode, "batch": 10})).await;
        assert_eq!(payloads(&response.records), vec!["small"], "{mode}");
        assert_eq!(response.status, 413, "{mode}: {}", response.description);
        assert!(
            response
                .description
                .contains(&format!("offset {}", FIRST_OFFSET + 1)),
            "{mode}: {}",
            response.description
        );
        assert_eq!(response.next_offset, Some(FIRST_OFFSET + 1), "{mode}");
    }
    let after = replay_once(
        &client,
        "events",
        json!({"start": {"offset": FIRST_OFFSET + 2}}),
    )
    .await;
    assert_eq!(payloads(&after.records), vec!["last"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_saturate_and_ambiguous_positions_are_refused() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    for payload in ["1", "2", "3"] {
        request_with_pairs(&client, "events.a", &[], payload).await;
    }
    let count = |request: Value| {
        let client = client.clone();
        async move {
            let response = replay_once(&client, "events", request).await;
            (response.records.len(), response.status)
        }
    };
    assert_eq!(
        count(json!({"start": {"time": "2500-01-01T00:00:00Z"}})).await,
        (0, 404),
        "a start after 2262 finds nothing yet"
    );
    assert_eq!(
        count(json!({"start": {"time": 18446744073709551615u64}})).await,
        (0, 404)
    );
    assert_eq!(
        count(json!({"end": {"time": "9999-12-31T23:59:59Z"}}))
            .await
            .0,
        3,
        "an end after 2262 bounds nothing"
    );
    assert_eq!(
        count(json!({"start": {"time": "1900-01-01T00:00:00Z"}}))
            .await
            .0,
        3
    );
    for (request, reason) in [
        (
            json!({"start": {"offset": 5, "time": 1}}),
            "exactly one of offset or time",
        ),
        (json!({"end": {"offset": 0}}), "before the first offset"),
        (
            json!({"start": {"time": "2026-13-01T00:00:00Z"}}),
            "month 13",
        ),
    ] {
        let response = replay_once(&client, "events", request.clone()).await;
        assert_eq!(response.status, 400, "{request}");
        assert!(
            response.description.contains(reason),
            "{request}: {}",
            response.description
        );
    }
    // An end before the start is an empty range, complete at once; the
    // reader stands where it started.
    let empty = replay_once(
        &client,
        "events",
        json!({"start": {"offset": 3}, "end": {"offset": 2}}),
    )
    .await;
    assert_eq!(
        (empty.records.len(), empty.status, empty.next_offset),
        (0, 204, Some(3))
    );
    let extra = replay_once(&client, "events.x", json!({})).await;
    assert_eq!(extra.status, 400);
    assert!(
        extra.description.contains("$NWAL.REPLAY.events.x"),
        "{}",
        extra.description
    );
}

fn process_threads_and_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("Threads:"), field("VmRSS:") * 1024)
}

/// The 99th percentile of `count` acked publishes, one after the other.
async fn ack_latency_p99(client: &async_nats::Client, count: usize) -> Duration {
    let mut latencies = Vec::with_capacity(count);
    for index in 0..count {
        let started = Instant::now();
        let ack = request_with_pairs(client, "events.load", &[], format!("load {index}")).await;
        assert!(ack["seq"].is_u64(), "{ack}");
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies[count * 99 / 100]
}

/// 5 000 long polls at once: `api.replays_max` are served, the rest get a
/// 503 at once; threads and memory stay bounded and publishes keep being
/// acknowledged about as fast as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_long_polls_are_bounded_and_publishes_stay_fast() {
    const REQUESTS: usize = 5_000;
    const REPLAYS_MAX: usize = 256;
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let natswal = Natswal::start(
        &nats.url(),
        data.path(),
        &format!("[api]\nreplays_max = {REPLAYS_MAX}\n{EVENTS_STREAM}"),
    );
    let client = connect(&nats.url()).await;
    let quiet_p99 = ack_latency_p99(&client, 200).await;
    let (threads_before, rss_before) = process_threads_and_rss(natswal.pid());
    let pollers = connect(&nats.url()).await;
    let mut answers = pollers.subscribe("_POLL.>").await.unwrap();
    pollers.flush().await.unwrap();
    // Long polls on a subject nobody publishes to: they wait their whole
    // `wait_ms`, whatever else is stored meanwhile.
    let request = json!({"start": "latest", "filter": "events.never", "wait_ms": 15_000});
    for index in 0..REQUESTS {
        pollers
            .publish_with_reply(
                "$NWAL.REPLAY.events",
                format!("_POLL.{index}"),
                Bytes::from(request.to_string()),
            )
            .await
            .unwrap();
    }
    pollers.flush().await.unwrap();
    let mut refused = 0usize;
    while refused < REQUESTS - REPLAYS_MAX {
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.next())
            .await
            .expect("the requests past replays_max are refused at once")
            .unwrap();
        let headers = answer.headers.clone().unwrap_or_default();
        let status = headers.get("Nwal-Status").map(|value| value.to_string());
        assert_eq!(
            status.as_deref(),
            Some("503"),
            "only refusals come before the long polls end: {headers:?}"
        );
        assert!(headers
            .get("Nwal-Description")
            .unwrap()
            .as_str()
            .contains("replays_max"));
        refused += 1;
    }
    let busy_p99 = ack_latency_p99(&client, 200).await;
    let (threads_during, rss_during) = process_threads_and_rss(natswal.pid());
    eprintln!(
        "ack p99 quiet {quiet_p99:?}, with {REPLAYS_MAX} long polls {busy_p99:?}; threads {threads_before} -> {threads_during}; RSS {} -> {} MiB",
        rss_before >> 20,
        rss_during >> 20
    );
    assert!(
        threads_during <= threads_before + 16,
        "threads stay bounded: {threads_before} -> {threads_during}"
    );
    assert!(
        rss_during <= rss_before + (64 << 20),
        "memory stays bounded: {} -> {} MiB",
        rss_before >> 20,
        rss_during >> 20
    );
    // Generous: the machine is shared; a replay on the async workers or
    // unbounded tasks would cost far more than this.
    assert!(
        busy_p99 <= quiet_p99 * 10 + Duration::from_millis(250),
        "publishes keep their latency: p99 {quiet_p99:?} -> {busy_p99:?}"
    );
    // The served long polls end with their usual status.
    let mut ended = 0usize;
    while ended < REPLAYS_MAX {
        let answer = tokio::time::timeout(Duration::from_secs(30), answers.next())
            .await
            .expect("every served long poll ends")
            .unwrap();
        let headers = answer.headers.clone().unwrap_or_default();
        assert_eq!(
            headers.get("Nwal-Status").map(|value| value.to_string()),
            Some("404".to_string())
        );
        ended += 1;
    }
}

/// `natswal replay --follow` at the head of a pipe: each response's records
/// reach the pipe while it waits for more, and SIGINT or SIGTERM ends it
/// cleanly (exit 0) with everything received printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_follow_in_a_pipeline_flushes_and_stops_on_signals() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    for payload in ["one", "two", "three"] {
        request_with_pairs(&client, "events.a", &[], payload).await;
    }
    let mut expected: Vec<String> = ["one", "two", "three"].map(String::from).to_vec();
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let mut child = std::process::Command::new(natswal_binary())
            .args([
                "replay",
                "events",
                "--follow",
                "--output",
                "raw",
                "--nats-url",
            ])
            .arg(nats.url())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        let reading = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                if sender.send(line.unwrap()).is_err() {
                    break;
                }
            }
        });
        let next_line = || {
            lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|error| panic!("{name}: a record reaches the pipe: {error}"))
        };
        // Everything stored so far, then a record stored while it waits.
        let mut seen: Vec<String> = expected.iter().map(|_| next_line()).collect();
        let later = format!("later {name}");
        request_with_pairs(&client, "events.a", &[], &later).await;
        seen.push(next_line());
        expected.push(later);
        // SAFETY: kill(2) with a valid pid and signal touches no memory.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert!(
            status.success(),
            "{name} ends the replay cleanly: {status:?}"
        );
        reading.join().unwrap();
        seen.extend(lines.try_iter());
        assert_eq!(seen, expected, "{name}");
    }
}
