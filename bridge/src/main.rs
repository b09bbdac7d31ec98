//! The `natswal` binary: durable storage behind a NATS broker.

mod bench;
mod error;
mod offline;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Durable, replicated storage behind a NATS broker: captures subjects into a
/// write-ahead log, acknowledges publishers once messages are durable, and
/// replays any subject from any offset or time.
#[derive(Debug, Parser)]
#[command(name = "natswal", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: capture the configured subjects, ack publishers, serve replay (coming with the bridge).
    Serve,
    /// Replay a stream over NATS to stdout or to other subjects (coming with the bridge).
    Replay,
    /// Show streams, offsets, sizes and lag of a running server (coming with the bridge).
    Status,
    /// Check every frame and index of a stream directory offline, without changing it.
    Verify {
        /// A stream directory (<data_dir>/streams/<name>).
        dir: PathBuf,
    },
    /// Repair a stream directory offline: truncate torn tails, move damaged ranges to quarantine/, rebuild indexes.
    Repair {
        /// A stream directory (<data_dir>/streams/<name>).
        dir: PathBuf,
    },
    /// Produce a copy of a stream as it was at an offset or a time (point-in-time recovery).
    Restore {
        /// The stream directory to restore from (left unchanged).
        dir: PathBuf,
        /// Directory to write the restored stream to (must not exist or be empty).
        #[arg(long)]
        output: PathBuf,
        /// Keep records up to and including this offset.
        #[arg(long, conflicts_with = "to_time", required_unless_present = "to_time")]
        to_offset: Option<u64>,
        /// Keep records up to and including this time (RFC 3339, e.g. 2026-11-24T10:00:00Z, or Unix nanoseconds).
        #[arg(long)]
        to_time: Option<String>,
    },
    /// Benchmarks, each beside a peer measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The WAL engine alone: append throughput, latency, scan, memory and open time against the raw disk.
    Wal(bench::wal::WalBenchArgs),
    /// Internal: the child process of the crash-open case.
    #[command(hide = true)]
    WalWriter {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let result = runtime.block_on(run(cli.command));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("natswal: error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> error::Result<ExitCode> {
    match command {
        Command::Serve | Command::Replay | Command::Status => {
            eprintln!(
                "natswal: this subcommand arrives with the NATS bridge; see `natswal --help`"
            );
            Ok(ExitCode::from(2))
        }
        Command::Verify { dir } => offline::verify(&dir),
        Command::Repair { dir } => offline::repair(&dir),
        Command::Restore {
            dir,
            output,
            to_offset,
            to_time,
        } => offline::restore(&dir, &output, to_offset, to_time.as_deref()),
        Command::Bench(BenchCommand::Wal(args)) => {
            bench::wal::run(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::WalWriter { dir }) => bench::wal::writer_child(&dir)
            .await
            .map(|()| ExitCode::SUCCESS),
    }
}
