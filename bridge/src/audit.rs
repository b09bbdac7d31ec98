//! The audit log: an append-only JSON-lines file of administrative actions
//! (repair, truncate, restore, retention deletions, key rotation, denied
//! requests, config reloads, start and stop), each with time, actor, target
//! and outcome.
//!
//! Every line is `<json> <crc32c of the json, 8 hex digits>`. The JSON
//! carries `seq` (1, 2, 3 ...) and `prev` (the CRC of the line before), so
//! `natswal audit` detects a changed line (CRC), a removed or reordered line
//! (sequence and chain) and a truncated tail ending mid-line. Each entry is
//! synced before the action it records is reported done.

use crate::error::{BridgeError, Result};
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// An open audit log.
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<Writer>,
}

struct Writer {
    file: File,
    sequence: u64,
    previous_crc: u32,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

/// Splits a line into its JSON and its CRC.
fn split_line(line: &str) -> Option<(&str, u32)> {
    let (json, crc) = line.rsplit_once(' ')?;
    (crc.len() == 8).then_some(())?;
    Some((json, u32::from_str_radix(crc, 16).ok()?))
}

impl AuditLog {
    /// Opens (or creates) the log and continues its sequence and chain.
    pub fn open(path: &Path) -> Result<AuditLog> {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| {
                BridgeError::io(format!("cannot create {}", parent.display()), error)
            })?;
        }
        let existing = std::fs::read_to_string(path).unwrap_or_default();
        let (mut sequence, mut previous_crc) = (0, 0);
        if let Some(last) = existing.lines().rev().find(|line| !line.trim().is_empty()) {
            if let Some((json, crc)) = split_line(last) {
                sequence = serde_json::from_str::<Value>(json)
                    .ok()
                    .and_then(|value| value["seq"].as_u64())
                    .unwrap_or(0);
                previous_crc = crc;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| {
                BridgeError::io(format!("cannot open audit log {}", path.display()), error)
            })?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            state: Mutex::new(Writer {
                file,
                sequence,
                previous_crc,
            }),
        })
    }

    /// Appends and syncs one entry.
    pub fn record(
        &self,
        action: &str,
        actor: &str,
        target: &str,
        outcome: &str,
        details: Value,
    ) -> Result<()> {
        let mut writer = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sequence = writer.sequence + 1;
        let entry = json!({
            "seq": sequence,
            "time": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "action": action,
            "actor": actor,
            "target": target,
            "outcome": outcome,
            "details": details,
            "prev": format!("{:08x}", writer.previous_crc),
        })
        .to_string();
        let crc = crc32c::crc32c(entry.as_bytes());
        let line = format!("{entry} {crc:08x}\n");
        let context = || format!("cannot write audit log {}", self.path.display());
        writer
            .file
            .write_all(line.as_bytes())
            .map_err(|error| BridgeError::io(context(), error))?;
        writer
            .file
            .sync_data()
            .map_err(|error| BridgeError::io(context(), error))?;
        writer.sequence = sequence;
        writer.previous_crc = crc;
        Ok(())
    }

    /// Records, logging instead of failing (for events whose action already
    /// happened, like a retention deletion).
    pub fn record_or_log(
        &self,
        action: &str,
        actor: &str,
        target: &str,
        outcome: &str,
        details: Value,
    ) {
        if let Err(error) = self.record(action, actor, target, outcome, details) {
            tracing::error!(%error, action, target, "cannot write the audit log");
        }
    }
}

/// What `natswal audit` found.
#[derive(Debug, Default)]
pub struct Verification {
    pub entries: Vec<Value>,
    pub problems: Vec<String>,
}

/// Reads and checks a whole audit log.
pub fn verify(path: &Path) -> Result<Verification> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        BridgeError::io(format!("cannot read audit log {}", path.display()), error)
    })?;
    let mut verification = Verification::default();
    let mut previous_crc = 0u32;
    let mut expected_sequence = 1u64;
    if !text.is_empty() && !text.ends_with('\n') {
        verification
            .problems
            .push("the last line is incomplete (the file was cut)".to_string());
    }
    for (number, line) in text.lines().enumerate() {
        let line_number = number + 1;
        let Some((json, crc)) = split_line(line) else {
            verification
                .problems
                .push(format!("line {line_number}: not `<json> <crc>`"));
            continue;
        };
        if crc32c::crc32c(json.as_bytes()) != crc {
            verification.problems.push(format!(
                "line {line_number}: CRC mismatch (the entry was changed)"
            ));
        }
        let value: Value = match serde_json::from_str(json) {
            Ok(value) => value,
            Err(error) => {
                verification
                    .problems
                    .push(format!("line {line_number}: not JSON ({error})"));
                continue;
            }
        };
        let sequence = value["seq"].as_u64().unwrap_or(0);
        if sequence != expected_sequence {
            verification.problems.push(format!(
                "line {line_number}: sequence {sequence} where {expected_sequence} was expected (entries missing or reordered)"
            ));
        }
        if value["prev"].as_str() != Some(format!("{previous_crc:08x}").as_str()) {
            verification.problems.push(format!(
                "line {line_number}: does not chain to the entry before it"
            ));
        }
        expected_sequence = sequence + 1;
        previous_crc = crc;
        verification.entries.push(value);
    }
    Ok(verification)
}

/// The actor of CLI actions.
pub fn cli_actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_chain_and_tampering_is_found() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record(
            "repair",
            "cli:test",
            "events",
            "ok",
            json!({"quarantined": 1}),
        )
        .unwrap();
        log.record("retention_delete", "natswal", "events", "ok", json!({}))
            .unwrap();
        drop(log);
        // Reopening continues the chain.
        AuditLog::open(&path)
            .unwrap()
            .record("key_rotation", "natswal", "events", "ok", json!({}))
            .unwrap();
        let checked = verify(&path).unwrap();
        assert!(checked.problems.is_empty(), "{:?}", checked.problems);
        assert_eq!(checked.entries.len(), 3);
        assert_eq!(checked.entries[2]["seq"], 3);
        let text = std::fs::read_to_string(&path).unwrap();
        // A changed entry.
        std::fs::write(&path, text.replacen("\"ok\"", "\"denied\"", 1)).unwrap();
        assert!(verify(&path)
            .unwrap()
            .problems
            .iter()
            .any(|problem| problem.contains("CRC")));
        // A removed entry.
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        let problems = verify(&path).unwrap().problems;
        assert!(
            problems
                .iter()
                .any(|problem| problem.contains("sequence 3 where 2")),
            "{problems:?}"
        );
    }
}
