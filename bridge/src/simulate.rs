//! `natswal sim`: runs the engine's deterministic simulator (natswal::sim)
//! over many seeds, on every core, with progress; or one seed with every
//! event printed, to replay a failure. Exit status 1 when a seed fails.

use indicatif::{ProgressBar, ProgressStyle};
use natswal::sim::{run_seed, SimFailure, SimOptions, SimSummary};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Options of `natswal sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Run only this seed (with --verbose: print every event).
    #[arg(long, conflicts_with_all = ["seeds", "first_seed"])]
    seed: Option<u64>,
    /// How many seeds to run.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// The first seed of the run.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Steps per seed.
    #[arg(long, default_value_t = SimOptions::default().steps)]
    steps: u32,
    /// Print every event of the run (for one seed).
    #[arg(long)]
    verbose: bool,
    /// Threads (default: every core).
    #[arg(long)]
    jobs: Option<usize>,
}

pub fn run(args: SimArgs) -> ExitCode {
    let options = SimOptions {
        steps: args.steps,
        verbose: args.verbose,
    };
    if let Some(seed) = args.seed {
        return match run_seed(seed, &options) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(failure) => {
                println!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |cores| cores.get()))
        .max(1);
    let started = std::time::Instant::now();
    let (summary, mut failures) = run_parallel(args.first_seed, args.seeds, &options, jobs);
    failures.sort_by_key(|failure| failure.seed);
    println!(
        "{summary} in {:.1} s ({jobs} threads)",
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        println!("no invariant violated");
        return ExitCode::SUCCESS;
    }
    for failure in failures.iter().take(10) {
        println!("\n{failure}");
    }
    let seeds: Vec<String> = failures
        .iter()
        .map(|failure| failure.seed.to_string())
        .collect();
    println!("{} seeds failed: {}", failures.len(), seeds.join(" "));
    ExitCode::FAILURE
}

/// Seeds are handed out one at a time, so a slow seed does not hold up a
/// whole share.
fn run_parallel(
    first: u64,
    count: u64,
    options: &SimOptions,
    jobs: usize,
) -> (SimSummary, Vec<SimFailure>) {
    let bar = ProgressBar::new(count);
    bar.set_style(
        ProgressStyle::with_template(
            "simulating [{bar:40}] {pos}/{len} seeds ({per_sec}, {eta}) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let next = AtomicU64::new(first);
    let end = first.saturating_add(count);
    let total = Mutex::new(SimSummary::default());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                let result = run_seed(seed, options);
                let mut total = total
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                match result {
                    Ok(summary) => total.add(&summary),
                    Err(failure) => {
                        total.seeds += 1;
                        let mut failures = failures
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        failures.push(failure);
                        bar.set_message(format!("{} failed", failures.len()));
                    }
                }
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    (
        total
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
        failures
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    )
}
