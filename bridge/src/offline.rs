//! Offline commands on a stream directory: verify, repair, restore. They
//! work on files only; the stream must not be open in a running server.

use crate::error::{BridgeError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use natswal::io::os::OsFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::{PointInTime, RecoveryManager, RecoveryMode};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

fn file_system() -> Arc<dyn FileSystem> {
    Arc::new(OsFileSystem::new(WriteMode::Pwrite))
}

fn require_directory(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(BridgeError::InvalidArgument(format!(
            "{} is not a directory (expected a stream directory such as data/streams/orders)",
            dir.display()
        )))
    }
}

fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn directory_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .filter(|entry| entry.file_name().to_string_lossy().ends_with(".log"))
                .filter_map(|entry| entry.metadata().ok())
                .map(|metadata| metadata.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `natswal verify DIR`: exit 0 when healthy, 1 when damaged.
pub fn verify(dir: &Path) -> Result<ExitCode> {
    require_directory(dir)?;
    let bar = progress_bar(directory_bytes(dir), "verifying");
    let report = RecoveryManager::verify(&file_system(), dir, &mut |done| bar.set_position(done))?;
    bar.finish_and_clear();
    println!(
        "{}: {} segments, {} records, {} bytes, next offset {}",
        dir.display(),
        report.segments,
        report.records,
        report.bytes,
        report.next_offset
    );
    if let Some(torn) = &report.torn_tail {
        println!("torn tail (left behind by the next open): {torn}");
    }
    for (first, next) in &report.recorded_gaps {
        println!("recorded gap: offsets {first}..{next} were lost to damage and reported by an earlier repair (see quarantine/)");
    }
    for problem in &report.problems {
        println!("PROBLEM: {problem}");
    }
    if report.is_healthy() {
        println!("OK");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "DAMAGED: run `natswal repair {}` to quarantine the damaged ranges",
            dir.display()
        );
        Ok(ExitCode::FAILURE)
    }
}

/// `natswal repair DIR`: opens the stream in repair mode and reports.
pub fn repair(dir: &Path, audit_log: Option<&Path>) -> Result<ExitCode> {
    require_directory(dir)?;
    let audit = open_audit(dir, audit_log)?;
    let bar = ProgressBar::new_spinner();
    bar.set_message(format!("repairing {}", dir.display()));
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    let recovered = RecoveryManager::recover(&file_system(), dir, RecoveryMode::Repair);
    bar.finish_and_clear();
    let report = audited(
        &audit,
        "repair",
        &dir.display().to_string(),
        recovered,
        serde_json::json!({}),
        |report| {
            serde_json::json!({
                "truncated": report.truncated.iter().map(|tail| format!("{}@{}", tail.segment.display(), tail.position)).collect::<Vec<_>>(),
                "quarantined": report.quarantined.iter().map(|range| range.saved_to.display().to_string()).collect::<Vec<_>>(),
                "lost_offsets": report.lost.iter().map(|lost| format!("{}..{}", lost.first_offset, lost.next_offset)).collect::<Vec<_>>(),
                "rebuilt_indexes": report.rebuilt_indexes.len(),
                "rebuilt_metadata": report.rebuilt_metadata,
            })
        },
    )?;
    print_recovery(&report);
    let changed = !report.quarantined.is_empty()
        || !report.truncated.is_empty()
        || !report.lost.is_empty()
        || !report.rebuilt_indexes.is_empty()
        || !report.completed_seals.is_empty()
        || report.completed_truncation.is_some()
        || report.rebuilt_metadata;
    if changed {
        println!(
            "repaired: {} segments; `natswal verify` checks the result",
            report.segments
        );
    } else {
        println!("nothing to repair: {} segments", report.segments);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what a recovery found and did, one line per change.
fn print_recovery(report: &natswal::RecoveryReport) {
    for tail in &report.truncated {
        println!(
            "left a torn tail of {} at byte {} ({} unprovable frames after it): {}; a write cut by a crash holds nothing acknowledged at fsync (only damage to the very last synced frames looks the same: docs/FORMAT.md 7.6)",
            tail.segment.display(),
            tail.position,
            tail.frames_dropped,
            tail.reason
        );
    }
    for range in &report.quarantined {
        println!(
            "quarantined {} bytes [{}, {}) of {}: {} -> {}",
            range.end - range.start,
            range.start,
            range.end,
            range.segment.display(),
            range.reason,
            range.saved_to.display()
        );
    }
    for lost in &report.lost {
        println!(
            "lost offsets {}..{} ({} records) in {}: recorded as a gap; later offsets are unchanged",
            lost.first_offset,
            lost.next_offset,
            lost.next_offset - lost.first_offset,
            lost.segment.display()
        );
    }
    for sealed in &report.completed_seals {
        println!("finished the interrupted seal of {}", sealed.display());
    }
    if let Some(offset) = report.completed_truncation {
        println!("finished an interrupted truncation from offset {offset}");
    }
    if report.rebuilt_metadata {
        println!("rebuilt the stream metadata from the log (a Raft vote, commit index and purge point it held are lost)");
    }
    for index in &report.rebuilt_indexes {
        println!("rebuilt index {}", index.display());
    }
}

/// Audits the outcome of an offline action by the CLI's user: `ok` with
/// `details` of its report, or `error` with `error_details` and the error
/// (best effort: the action's error is what the caller returns).
fn audited<T>(
    audit: &crate::audit::AuditLog,
    action: &str,
    target: &str,
    result: natswal::Result<T>,
    error_details: serde_json::Value,
    details: impl FnOnce(&T) -> serde_json::Value,
) -> Result<T> {
    let actor = crate::audit::cli_actor();
    match result {
        Ok(report) => {
            audit.record(action, &actor, target, "ok", details(&report))?;
            Ok(report)
        }
        Err(error) => {
            let mut error_details = error_details;
            error_details["error"] = serde_json::Value::from(error.to_string());
            audit.record_or_log(action, &actor, target, "error", error_details);
            Err(error.into())
        }
    }
}

/// The audit log of offline commands: `--audit-log`, else
/// `<data_dir>/audit.log` when `dir` is `<data_dir>/streams/<name>`, else
/// `audit.log` beside the stream directory.
fn open_audit(dir: &Path, explicit: Option<&Path>) -> Result<crate::audit::AuditLog> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => {
            let parent = dir.parent().unwrap_or(Path::new("."));
            if parent.file_name().is_some_and(|name| name == "streams") {
                parent.parent().unwrap_or(Path::new(".")).join("audit.log")
            } else {
                parent.join("audit.log")
            }
        }
    };
    crate::audit::AuditLog::open(&path)
}

/// `natswal audit [FILE]`: prints and verifies the audit log.
pub fn audit(path: &Path, json: bool) -> Result<ExitCode> {
    let verification = crate::audit::verify(path)?;
    for entry in &verification.entries {
        if json {
            println!("{entry}");
        } else {
            println!(
                "{:>6}  {}  {:<18} {:<12} {:<24} {:<8} {}",
                entry["seq"],
                entry["time"].as_str().unwrap_or_default(),
                entry["action"].as_str().unwrap_or_default(),
                entry["actor"].as_str().unwrap_or_default(),
                entry["target"].as_str().unwrap_or_default(),
                entry["outcome"].as_str().unwrap_or_default(),
                entry["details"]
            );
        }
    }
    for problem in &verification.problems {
        eprintln!("PROBLEM: {problem}");
    }
    if verification.problems.is_empty() {
        eprintln!(
            "{}: {} entries, chain intact",
            path.display(),
            verification.entries.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{}: the audit log was altered or damaged", path.display());
        Ok(ExitCode::FAILURE)
    }
}

/// `natswal truncate DIR --from-offset N`: removes the records from offset
/// N on, durably (Kafka's "delete records" from the other end: it undoes a
/// bad suffix). The stream must not be open elsewhere (its lock says).
pub fn truncate(dir: &Path, from_offset: u64, audit_log: Option<&Path>) -> Result<ExitCode> {
    require_directory(dir)?;
    if from_offset < natswal::FIRST_OFFSET {
        return Err(BridgeError::InvalidArgument(format!(
            "--from-offset must be at least {} (the first offset)",
            natswal::FIRST_OFFSET
        )));
    }
    let audit = open_audit(dir, audit_log)?;
    let truncated = RecoveryManager::truncate_suffix(&file_system(), dir, from_offset)
        // Recover once, so the indexes match and the result is checked.
        .and_then(|report| {
            RecoveryManager::recover(&file_system(), dir, RecoveryMode::Strict).map(|_| report)
        });
    let target = dir.display().to_string();
    let report = audited(
        &audit,
        "truncate",
        &target,
        truncated,
        serde_json::json!({"from_offset": from_offset}),
        |report| {
            serde_json::json!({
                "from_offset": from_offset,
                "records_kept": report.records_kept,
                "records_removed": report.records_removed,
                "segments_removed": report.segments_removed,
                "next_offset": report.next_offset,
            })
        },
    )?;
    println!(
        "truncated {}: {} records removed, {} kept; the next record gets offset {}",
        dir.display(),
        report.records_removed,
        report.records_kept,
        report.next_offset
    );
    Ok(ExitCode::SUCCESS)
}

/// Parses RFC 3339 or Unix nanoseconds.
pub fn parse_time(text: &str) -> Result<i64> {
    crate::time::parse_time(text).map_err(BridgeError::InvalidArgument)
}

/// `natswal restore DIR --output OUT --to-offset N | --to-time T`.
pub fn restore(
    dir: &Path,
    output: &Path,
    to_offset: Option<u64>,
    to_time: Option<&str>,
    audit_log: Option<&Path>,
) -> Result<ExitCode> {
    require_directory(dir)?;
    let audit = open_audit(dir, audit_log)?;
    let point = match (to_offset, to_time) {
        (Some(offset), None) => PointInTime::Offset(offset),
        (None, Some(time)) => PointInTime::Time(parse_time(time)?),
        _ => {
            return Err(BridgeError::InvalidArgument(
                "give exactly one of --to-offset or --to-time".to_string(),
            ))
        }
    };
    let restored = RecoveryManager::restore(&file_system(), dir, output, point)
        // Recover the copy once, so its indexes are built and it is checked.
        .and_then(|report| {
            RecoveryManager::recover(&file_system(), output, RecoveryMode::Strict).map(|_| report)
        });
    let target = format!("{} -> {}", dir.display(), output.display());
    let report = audited(
        &audit,
        "restore",
        &target,
        restored,
        serde_json::json!({}),
        |report| serde_json::json!({"point": format!("{point:?}"), "records_kept": report.records_kept, "records_left_out": report.records_removed}),
    )?;
    println!(
        "restored {} records (offsets up to {}) into {}; {} later records left out",
        report.records_kept,
        report.next_offset.saturating_sub(1),
        output.display(),
        report.records_removed
    );
    Ok(ExitCode::SUCCESS)
}
