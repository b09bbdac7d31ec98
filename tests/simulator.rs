//! The deterministic simulator (src/sim.rs) over many seeds: appends,
//! crashes at random file-system operations, torn writes, failed syncs,
//! full disks, bit flips, truncations, installs and key rotations, with the
//! invariants checked after every restart and power loss. CI runs 2000
//! seeds; `NATSWAL_SIM_SEEDS` and `NATSWAL_SIM_FIRST_SEED` choose others
//! (`natswal sim --seeds 10000` runs more, with progress).

use natswal::sim::{run_seeds, SimOptions};

#[test]
fn the_simulator_finds_nothing() {
    let count: u64 = std::env::var("NATSWAL_SIM_SEEDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(2000);
    let first: u64 = std::env::var("NATSWAL_SIM_FIRST_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1);
    let (summary, failures) = run_seeds(first, count, &SimOptions::default(), &mut |_, _| {});
    eprintln!("{summary}");
    for failure in failures.iter().take(5) {
        eprintln!("{failure}");
    }
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed (first: seed {})",
        failures.len(),
        failures[0].seed
    );
    assert_eq!(summary.seeds, count);
    // The runs exercise what they claim to.
    assert!(summary.power_losses > count / 2, "{summary}");
    assert!(
        summary.failed_syncs > 0 && summary.bit_flips > 0 && summary.repairs > 0,
        "{summary}"
    );
    assert!(summary.truncations > 0 && summary.installs > 0, "{summary}");
}
