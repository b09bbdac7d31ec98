//! Encryption at rest and compression through the server's configuration,
//! key rotation, access control for replay and status, and the audit log
//! (with `natswal audit` and SIGHUP reloads).

mod support;

use bytes::Bytes;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use support::*;

const MARKER: &str = "SECRET-MARKER-93af";

fn write_key(directory: &Path, name: &str, byte: u8) -> String {
    let path = directory.join(name);
    std::fs::write(&path, format!("{}\n", format!("{byte:02x}").repeat(32))).unwrap();
    path.display().to_string()
}

fn stream_files_contain(data: &Path, needle: &str) -> bool {
    let directory = data.join("streams/events");
    std::fs::read_dir(directory)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".log"))
        .any(|entry| memchr_find(&std::fs::read(entry.path()).unwrap(), needle.as_bytes()))
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

async fn publish(client: &async_nats::Client, count: usize, from: usize) {
    for index in from..from + count {
        let payload = format!("{{\"index\":{index},\"note\":\"{MARKER}\"}}");
        let ack = client
            .request(format!("events.e.{}", index % 3), Bytes::from(payload))
            .await
            .unwrap();
        let ack: Value = serde_json::from_slice(&ack.payload).unwrap();
        assert!(ack.get("seq").is_some(), "{ack}");
    }
}

fn audit_entries(data: &Path) -> Vec<Value> {
    std::fs::read_to_string(data.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line.rsplit_once(' ').unwrap().0).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_compressed_stream_round_trips_and_keys_rotate() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_one = write_key(keys.path(), "1.key", 0x11);
    let key_two = write_key(keys.path(), "2.key", 0x22);
    let config = |key_id: u32, keys_section: &str| {
        format!(
            "{keys_section}[[streams]]\nname = \"events\"\nsubjects = [\"events.>\"]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nencryption_key_id = {key_id}\nsegment_bytes = \"1MiB\"\nmax_message_bytes = \"64KiB\"\n"
        )
    };
    let one = format!("[[keys]]\nid = 1\nfile = \"{key_one}\"\n");
    let both = format!("{one}[[keys]]\nid = 2\nfile = \"{key_two}\"\n");
    let mut natswal = Natswal::start(&nats.url(), data.path(), &config(1, &one));
    let client = connect(&nats.url()).await;
    publish(&client, 200, 0).await;
    assert!(
        !stream_files_contain(data.path(), MARKER),
        "encrypted segments hold no plaintext"
    );
    drop(natswal);
    // Rotate: new segments use key 2, old ones stay readable with key 1.
    natswal = Natswal::start(&nats.url(), data.path(), &config(2, &both));
    publish(&client, 200, 200).await;
    let records = replay_all(&client, "events", json!({})).await;
    assert_eq!(records.len(), 400);
    for (index, record) in records.iter().enumerate() {
        assert_eq!(
            record.payload,
            format!("{{\"index\":{index},\"note\":\"{MARKER}\"}}")
        );
    }
    assert!(!stream_files_contain(data.path(), MARKER));
    let rotations: Vec<Value> = audit_entries(data.path())
        .into_iter()
        .filter(|entry| entry["action"] == "key_rotation")
        .collect();
    assert_eq!(rotations.len(), 1, "one rotation audited");
    assert_eq!(
        rotations[0]["details"],
        json!({"from_key_id": 1, "to_key_id": 2})
    );
    drop(natswal);
    // Key 1 missing: new data still works, old data fails clearly on read.
    let only_two = format!("[[keys]]\nid = 2\nfile = \"{key_two}\"\n");
    let _natswal = Natswal::start(&nats.url(), data.path(), &config(2, &only_two));
    let response = replay_once(&client, "events", json!({"batch": 10})).await;
    assert_eq!(response.status, 500);
    assert!(
        response.description.contains("key id 1")
            && response.description.contains("not configured"),
        "{}",
        response.description
    );
    let newest = replay_once(&client, "events", json!({"start": {"offset": 400}})).await;
    assert_eq!(
        newest.records.len(),
        1,
        "data under the configured key reads"
    );
}

#[test]
fn bad_key_sources_are_refused_at_start() {
    let data = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let short = keys.path().join("short.key");
    std::fs::write(&short, "abcd").unwrap();
    let cases = [
        (format!("[[keys]]\nid = 1\nfile = \"{}\"\n", short.display()), "64 hex digits"),
        ("[[keys]]\nid = 1\nfile = \"/nonexistent/1.key\"\n".to_string(), "cannot read key file"),
        ("[[keys]]\nid = 1\nenv = \"NATSWAL_TEST_KEY_UNSET\"\n".to_string(), "NATSWAL_TEST_KEY_UNSET"),
        ("[[keys]]\nid = 1\n".to_string(), "exactly one of `file`"),
        (
            "[[streams]]\nname = \"e\"\nsubjects = [\"e.>\"]\nencryption = \"aes-256-gcm\"\nencryption_key_id = 3\n".to_string(),
            "no [[keys]] entry has id 3",
        ),
    ];
    for (config, needle) in cases {
        let path = data.path().join("natswal.toml");
        std::fs::write(&path, &config).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
            .args(["serve", "--check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{config}");
        assert!(stderr.contains(needle), "{config}: {stderr}");
        assert!(
            !stderr.contains("abcd"),
            "key material never printed: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_status_obey_access_rules_and_denials_are_audited() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let rules = "[[access]]\nname = \"analytics\"\nreply_prefixes = [\"_INBOX_analytics.\"]\nreplay = [\"events.eu.>\"]\n[[access]]\nname = \"ops\"\nreply_prefixes = [\"_INBOX_ops.\"]\nreplay = [\"events.>\"]\nstatus = true\n";
    let config = format!("{rules}{EVENTS_STREAM}");
    let natswal = Natswal::start(&nats.url(), data.path(), &config);
    let writer = connect(&nats.url()).await;
    for region in ["eu", "us", "eu"] {
        writer
            .request(format!("events.{region}.x"), Bytes::from_static(b"r"))
            .await
            .unwrap();
    }
    let analytics = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_analytics")
        .connect(nats.url())
        .await
        .unwrap();
    let ops = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_ops")
        .connect(nats.url())
        .await
        .unwrap();
    // Allowed: analytics within events.eu.>, ops everything.
    let allowed = replay_all(&analytics, "events", json!({"filter": "events.eu.*"})).await;
    assert_eq!(allowed.len(), 2);
    assert_eq!(replay_all(&ops, "events", json!({})).await.len(), 3);
    // Denied: analytics outside its subjects, or without a filter (the whole
    // stream); an unknown requester; status without permission.
    for (client, request) in [
        (&analytics, json!({"filter": "events.us.*"})),
        (&analytics, json!({})),
        (&writer, json!({"filter": "events.eu.*"})),
    ] {
        let response = replay_once(client, "events", request.clone()).await;
        assert_eq!(response.status, 403, "{request}: {}", response.description);
        assert!(response.records.is_empty());
        assert!(
            response.description.starts_with("Forbidden"),
            "{}",
            response.description
        );
    }
    let denied_status = tokio::time::timeout(
        Duration::from_secs(5),
        analytics.request("$NWAL.STATUS", Bytes::new()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        denied_status
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Nwal-Status"))
            .map(|value| value.as_str().to_string()),
        Some("403".to_string())
    );
    let status = ops.request("$NWAL.STATUS", Bytes::new()).await.unwrap();
    let status: Value = serde_json::from_slice(&status.payload).unwrap();
    assert_eq!(status["streams"][0]["name"], "events");
    let denials: Vec<Value> = audit_entries(data.path())
        .into_iter()
        .filter(|entry| entry["outcome"] == "denied")
        .collect();
    assert_eq!(denials.len(), 4, "{denials:?}");
    assert!(denials
        .iter()
        .any(|entry| entry["action"] == "status_denied"));
    assert!(denials
        .iter()
        .any(|entry| entry["action"] == "replay_denied"
            && entry["actor"]
                .as_str()
                .unwrap()
                .starts_with("_INBOX_analytics.")));
    // SIGHUP reload: analytics may now replay everything.
    let widened = config.replace("replay = [\"events.eu.>\"]", "replay = [\"events.>\"]");
    std::fs::write(&natswal.config_path, format!("data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[nats]\nservers = [\"{}\"]\n{widened}", data.path().display(), natswal.http_port, nats.url())).unwrap();
    natswal.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = replay_once(&analytics, "events", json!({"filter": "events.us.*"})).await;
        if response.status != 403 {
            assert_eq!(response.records.len(), 1);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload did not take effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(audit_entries(data.path())
        .iter()
        .any(|entry| entry["action"] == "config_reload" && entry["outcome"] == "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_admin_actions_and_detects_tampering() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = format!("{EVENTS_STREAM}segment_bytes = \"64KiB\"\nmax_message_bytes = \"16KiB\"\nmax_messages = 100\n");
    let mut natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    for index in 0..2000 {
        client
            .publish(format!("events.r.{index}"), Bytes::from(vec![b'r'; 200]))
            .await
            .unwrap();
    }
    client
        .request("events.last", Bytes::from_static(b"last"))
        .await
        .unwrap();
    // Retention deletes whole sealed segments in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !audit_entries(data.path())
        .iter()
        .any(|entry| entry["action"] == "retention_delete")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no retention deletion audited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Offline commands refuse a stream the server has open, and say why.
    let stream = data.path().join("streams/events");
    for command in [vec!["repair"], vec!["truncate", "--from-offset", "5"]] {
        let refused = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
            .args(&command)
            .arg(&stream)
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{command:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("held by another process"), "{stderr}");
    }
    natswal.terminate();
    // Offline repair, truncation and restore are audited too.
    let repair = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
        .arg("repair")
        .arg(&stream)
        .output()
        .unwrap();
    assert!(
        repair.status.success(),
        "{}",
        String::from_utf8_lossy(&repair.stderr)
    );
    let restored = data.path().join("restored");
    let restore = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
        .arg("restore")
        .arg(&stream)
        .arg("--output")
        .arg(&restored)
        .args(["--to-offset", "1950"])
        .output()
        .unwrap();
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    let truncate = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
        .arg("truncate")
        .arg(&stream)
        .args(["--from-offset", "2001"])
        .output()
        .unwrap();
    assert!(
        truncate.status.success(),
        "{}",
        String::from_utf8_lossy(&truncate.stderr)
    );
    assert!(String::from_utf8_lossy(&truncate.stdout).contains("1 records removed"));
    let entries = audit_entries(data.path());
    let truncated = entries
        .iter()
        .rev()
        .find(|entry| entry["action"] == "truncate")
        .unwrap();
    assert_eq!(truncated["outcome"], "ok");
    assert_eq!(truncated["details"]["records_removed"], 1);
    assert_eq!(truncated["details"]["next_offset"], 2001);
    let refusals = entries
        .iter()
        .filter(|entry| {
            entry["outcome"] == "error"
                && (entry["action"] == "repair" || entry["action"] == "truncate")
        })
        .count();
    assert_eq!(
        refusals, 2,
        "refused offline commands are audited as errors"
    );
    let actions: Vec<String> = audit_entries(data.path())
        .iter()
        .map(|entry| entry["action"].as_str().unwrap().to_string())
        .collect();
    for expected in [
        "server_start",
        "retention_delete",
        "server_stop",
        "repair",
        "truncate",
        "restore",
    ] {
        assert!(
            actions.iter().any(|action| action == expected),
            "{expected} missing from {actions:?}"
        );
    }
    let audit_path = data.path().join("audit.log");
    let verified = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
        .arg("audit")
        .arg(&audit_path)
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(String::from_utf8_lossy(&verified.stdout).contains("retention_delete"));
    // Change one entry: the CRC no longer matches, `natswal audit` fails.
    let text = std::fs::read_to_string(&audit_path).unwrap();
    std::fs::write(
        &audit_path,
        text.replacen("\"outcome\":\"ok\"", "\"outcome\":\"no\"", 1),
    )
    .unwrap();
    let tampered = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
        .arg("audit")
        .arg(&audit_path)
        .output()
        .unwrap();
    assert!(!tampered.status.success());
    assert!(String::from_utf8_lossy(&tampered.stderr).contains("CRC mismatch"));
}

/// A start that fails (here: NATS unreachable) is audited once, as an
/// error with its reason, never as `server_start ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_is_audited_as_an_error() {
    let data = tempfile::tempdir().unwrap();
    let nowhere = format!("nats://127.0.0.1:{}", free_port());
    let config =
        format!("[nats]\nservers = [\"{nowhere}\"]\nconnect_timeout = \"1s\"\n{EVENTS_STREAM}");
    let failed = Natswal::try_start(&nowhere, data.path(), &config);
    assert!(failed.is_err(), "natswal cannot start without NATS");
    let starts: Vec<serde_json::Value> = audit_entries(data.path())
        .into_iter()
        .filter(|entry| entry["action"] == "server_start")
        .collect();
    assert_eq!(starts.len(), 1, "{starts:?}");
    assert_eq!(starts[0]["outcome"], "error");
    let reason = starts[0]["details"]["error"].as_str().unwrap();
    assert!(reason.contains(&nowhere), "{reason}");
}
