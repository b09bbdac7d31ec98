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
    file: Mutex<File>,
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

/// Holds `flock(LOCK_EX)` on the audit file: the server and offline
/// commands (separate processes) append to one log, and each entry must
/// follow the one really before it.
struct FileLock<'a>(&'a File);

impl<'a> FileLock<'a> {
    fn take(file: &'a File, path: &Path) -> Result<FileLock<'a>> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock(2) on a descriptor `file` owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(BridgeError::io(
                format!("cannot lock audit log {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(FileLock(file))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock(2) on the descriptor locked in `take`, still open.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// What an append continues from: the sequence and CRC of the last whole,
/// well-formed entry (0, 0 when none), and whether the file ends inside a
/// line (torn by a crash). Read from the end of the file.
struct LogEnd {
    sequence: u64,
    crc: u32,
    torn: bool,
}

fn log_end(file: &File, path: &Path) -> Result<LogEnd> {
    use std::os::unix::fs::FileExt;
    let context = || format!("cannot read audit log {}", path.display());
    let length = file
        .metadata()
        .map_err(|error| BridgeError::io(context(), error))?
        .len();
    let mut window = 64 * 1024u64;
    loop {
        let start = length.saturating_sub(window);
        let mut tail = vec![0u8; (length - start) as usize];
        file.read_exact_at(&mut tail, start)
            .map_err(|error| BridgeError::io(context(), error))?;
        let torn = tail.last().is_some_and(|last| *last != b'\n');
        let text = String::from_utf8_lossy(&tail);
        // The first line of a window that does not start the file may be
        // cut: only lines after a newline count.
        let lines: Vec<&str> = if start == 0 {
            text.lines().collect()
        } else {
            text.split_once('\n')
                .map_or(Vec::new(), |(_, rest)| rest.lines().collect())
        };
        let found = lines.iter().rev().find_map(|line| {
            let (json, crc) = split_line(line)?;
            (crc32c::crc32c(json.as_bytes()) == crc).then_some(())?;
            let sequence = serde_json::from_str::<Value>(json).ok()?["seq"].as_u64()?;
            Some((sequence, crc))
        });
        match found {
            Some((sequence, crc)) => {
                return Ok(LogEnd {
                    sequence,
                    crc,
                    torn,
                })
            }
            None if start == 0 => {
                return Ok(LogEnd {
                    sequence: 0,
                    crc: 0,
                    torn,
                })
            }
            None => window *= 4,
        }
    }
}

impl AuditLog {
    /// Opens (or creates) the log; entries continue its sequence and chain.
    pub fn open(path: &Path) -> Result<AuditLog> {
        let parent = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|error| {
            BridgeError::io(format!("cannot create {}", parent.display()), error)
        })?;
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|error| {
                BridgeError::io(format!("cannot open audit log {}", path.display()), error)
            })?;
        if !existed {
            // The new file's directory entry must be durable too.
            File::open(parent)
                .and_then(|directory| directory.sync_all())
                .map_err(|error| {
                    BridgeError::io(format!("cannot sync directory {}", parent.display()), error)
                })?;
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
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
        let file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _lock = FileLock::take(&file, &self.path)?;
        let end = log_end(&file, &self.path)?;
        let entry = json!({
            "seq": end.sequence + 1,
            "time": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "action": action,
            "actor": actor,
            "target": target,
            "outcome": outcome,
            "details": details,
            "prev": format!("{:08x}", end.crc),
        })
        .to_string();
        let crc = crc32c::crc32c(entry.as_bytes());
        // A line torn by a crash stays visible to `natswal audit` as damage,
        // but the new entry starts a line of its own.
        let separator = if end.torn { "\n" } else { "" };
        let line = format!("{separator}{entry} {crc:08x}\n");
        let context = || format!("cannot write audit log {}", self.path.display());
        (&*file)
            .write_all(line.as_bytes())
            .map_err(|error| BridgeError::io(context(), error))?;
        file.sync_data()
            .map_err(|error| BridgeError::io(context(), error))?;
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
    fn writers_sharing_one_log_keep_one_chain() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("audit.log");
        // Two opens are two open file descriptions, as two processes have.
        let server = AuditLog::open(&path).unwrap();
        let offline = AuditLog::open(&path).unwrap();
        std::thread::scope(|scope| {
            for (log, name) in [(&server, "server"), (&offline, "offline")] {
                scope.spawn(move || {
                    for index in 0..50 {
                        log.record("test", name, "events", "ok", json!({"index": index}))
                            .unwrap();
                    }
                });
            }
        });
        let checked = verify(&path).unwrap();
        assert!(checked.problems.is_empty(), "{:?}", checked.problems);
        assert_eq!(checked.entries.len(), 100);
        for (index, entry) in checked.entries.iter().enumerate() {
            assert_eq!(entry["seq"], index as u64 + 1);
        }
    }

    #[test]
    fn an_entry_after_a_torn_line_starts_its_own_line() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record("repair", "cli:test", "events", "ok", json!({}))
            .unwrap();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"seq\":2,\"action\":\"tor").unwrap();
        log.record("truncate", "cli:test", "events", "ok", json!({}))
            .unwrap();
        let checked = verify(&path).unwrap();
        // The torn line is reported, the new entry is intact and follows
        // the last whole one.
        assert_eq!(checked.problems.len(), 1, "{:?}", checked.problems);
        assert!(
            checked.problems[0].contains("line 2"),
            "{:?}",
            checked.problems
        );
        let last = checked.entries.last().unwrap();
        assert_eq!(
            (last["action"].as_str(), last["seq"].as_u64()),
            (Some("truncate"), Some(2))
        );
    }

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
