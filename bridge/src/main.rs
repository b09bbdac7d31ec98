//! The `natswal` binary: durable storage behind a NATS broker.

mod ack;
mod api;
mod audit;
mod batch;
mod bench;
mod client;
mod cluster;
mod config;
mod dedup;
mod error;
mod headers;
mod http;
mod ingest;
mod integer_map;
mod jetstream;
mod metrics;
mod nats;
mod offline;
mod protocol;
mod server;
mod simulate;
mod time;
mod wire;

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
    /// Run the server: capture the configured subjects into streams, ack publishers once durable, serve replay.
    Serve(ServeArgs),
    /// Replay a stream from a running server to stdout (JSON lines or raw) or re-publish it to NATS.
    Replay(client::ReplayArgs),
    /// Show the streams of a running server: offsets, sizes, appends in flight, state.
    Status(client::StatusArgs),
    /// A natswal cluster's replicated streams: init, status, add or remove a node, transfer a leader.
    #[command(subcommand)]
    Cluster(cluster::cli::ClusterCommand),
    /// Check every frame and index of a stream directory offline, without changing it.
    Verify {
        /// A stream directory (<data_dir>/streams/<name>).
        dir: PathBuf,
    },
    /// Repair a stream directory offline: truncate torn tails, move damaged ranges to quarantine/, rebuild indexes.
    Repair {
        /// A stream directory (<data_dir>/streams/<name>).
        dir: PathBuf,
        /// Audit log to record the repair in (default: <data_dir>/audit.log).
        #[arg(long)]
        audit_log: Option<PathBuf>,
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
        /// Audit log to record the restore in (default: <data_dir>/audit.log).
        #[arg(long)]
        audit_log: Option<PathBuf>,
    },
    /// Remove the records from an offset on, durably (offline; audited). An atomic batch straddling the cut goes whole.
    Truncate {
        /// The stream directory (<data_dir>/streams/<name>).
        dir: PathBuf,
        /// The first offset to remove.
        #[arg(long)]
        from_offset: u64,
        /// Audit log to record the truncation in (default: <data_dir>/audit.log).
        #[arg(long)]
        audit_log: Option<PathBuf>,
    },
    /// Print and verify the audit log (CRC per line, sequence and chain): exit 1 if it was altered.
    Audit {
        /// The audit log (default: data/audit.log).
        #[arg(default_value = "data/audit.log")]
        file: PathBuf,
        /// Print the entries as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks, each beside a peer measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the engine's deterministic simulator: crashes, torn writes, failed syncs, full disks and bit flips over many seeds, checking every acknowledged record.
    Sim(simulate::SimArgs),
}

/// Options of `natswal serve`.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML config file (see deploy/natswal.toml); without it, defaults: one stream
    /// `events` capturing `events.>` at fsync durability, NATS at nats://127.0.0.1:4222.
    #[arg(long, short, env = "NATSWAL_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// NATS server URL(s), comma separated (overrides nats.servers).
    #[arg(long, value_delimiter = ',')]
    nats_url: Option<Vec<String>>,
    /// Address of /metrics, /healthz, /readyz (overrides http.listen; empty disables).
    #[arg(long)]
    http_listen: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The WAL engine alone: append throughput, latency, scan, memory and open time against the raw disk.
    Wal(bench::wal::WalBenchArgs),
    /// natswal behind nats-server against JetStream and the broker's own limits, in one run.
    Nats(bench::nats::NatsBenchArgs),
    /// Many streams: threads, files, memory, disk, open time and skewed load, natswal beside JetStream.
    Streams(bench::streams::StreamsBenchArgs),
    /// A replicated stream's quorum path in one process (three nodes on loopback) beside one node, and failover time.
    Raft(bench::raft::RaftBenchArgs),
    /// Three natswal nodes at quorum beside a three-node JetStream cluster with an R3 stream, through the same brokers, and natswal's failover time.
    Cluster(bench::cluster::ClusterBenchArgs),
    /// Internal: the no-op responder of `bench nats` (acks at once, stores nothing).
    #[command(hide = true)]
    NoopResponder {
        #[arg(long)]
        nats_url: String,
        #[arg(long)]
        subject: String,
        /// Answer with natswal's own NATS client (bridge/src/wire) instead of async-nats.
        #[arg(long)]
        wire: bool,
    },
    /// Internal: the child process of the crash-open case.
    #[command(hide = true)]
    WalWriter {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Threads of tokio's blocking pool (replay reads, stream opens and closes).
const BLOCKING_THREADS_MAX: usize = 16;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs its life at info; client and offline commands only
    // warnings, so their output stays readable. RUST_LOG overrides both.
    // The simulator injects the faults the engine logs: it reports them
    // itself.
    // openraft warns at every heartbeat a down peer misses (ten a second);
    // natswal reports peers itself, so only openraft's errors are shown.
    let default_level = match cli.command {
        Command::Serve(_) => "info,openraft=error",
        Command::Sim(_) => "off",
        _ => "warn,openraft=error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Replay reads and stream opens run on the blocking pool; this bounds
        // its threads whatever the number of concurrent replays (more wait
        // in tokio's queue).
        .max_blocking_threads(BLOCKING_THREADS_MAX)
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
        Command::Serve(args) => {
            let overrides = config::Overrides {
                data_dir: args.data_dir,
                nats_servers: args.nats_url,
                http_listen: args.http_listen,
            };
            let config = config::Config::load(args.config.as_deref(), &overrides)?;
            if args.check {
                // Keys must load too (files readable, 64 hex digits).
                config.keyring()?;
                println!("configuration OK: {} stream(s)", config.streams.len());
                return Ok(ExitCode::SUCCESS);
            }
            let reload = server::Reload {
                path: args.config.clone(),
                overrides,
            };
            server::serve(config, reload)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Replay(args) => client::replay(args).await.map(|()| ExitCode::SUCCESS),
        Command::Status(args) => client::status(args).await.map(|()| ExitCode::SUCCESS),
        Command::Cluster(command) => cluster::cli::run(command).await.map(|()| ExitCode::SUCCESS),
        Command::Verify { dir } => offline::verify(&dir),
        Command::Repair { dir, audit_log } => offline::repair(&dir, audit_log.as_deref()),
        Command::Audit { file, json } => offline::audit(&file, json),
        Command::Truncate {
            dir,
            from_offset,
            audit_log,
        } => offline::truncate(&dir, from_offset, audit_log.as_deref()),
        Command::Restore {
            dir,
            output,
            to_offset,
            to_time,
            audit_log,
        } => offline::restore(
            &dir,
            &output,
            to_offset,
            to_time.as_deref(),
            audit_log.as_deref(),
        ),
        Command::Sim(args) => Ok(simulate::run(args)),
        Command::Bench(BenchCommand::Wal(args)) => {
            bench::wal::run(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Nats(args)) => {
            bench::nats::run(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Streams(args)) => {
            bench::streams::run(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Cluster(args)) => {
            bench::cluster::run(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Raft(args)) => {
            bench::raft::run(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::NoopResponder {
            nats_url,
            subject,
            wire,
        }) => if wire {
            bench::nats::noop_responder_wire(&nats_url, &subject).await
        } else {
            bench::nats::noop_responder(&nats_url, &subject).await
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::WalWriter { dir }) => bench::wal::writer_child(&dir)
            .await
            .map(|()| ExitCode::SUCCESS),
    }
}
