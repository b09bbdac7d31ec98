//! openraft's own storage test suite (`openraft::testing::log::Suite`)
//! against the real segment store: a stream's Log on real files with real
//! syncs, the log storage and state machine of this crate over it.

use natswal::io::os::OsFileSystem;
use natswal::io::FileSystem;
mod common;

use natswal::{Log, StreamConfig};
use natswal_replication::{StreamLogStore, StreamRaft, StreamStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;
use std::sync::Arc;

struct OnDisk {
    file_system: Arc<dyn FileSystem>,
}

impl StoreBuilder<StreamRaft, StreamLogStore, StreamStateMachine, tempfile::TempDir> for OnDisk {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, StreamLogStore, StreamStateMachine), StorageError<StreamRaft>>
    {
        let directory = tempfile::tempdir().expect("a temporary directory");
        let config = StreamConfig {
            // Small segments (the smallest allowed).
            segment_bytes_max: 64 * 1024,
            record_bytes_max: 1024,
            frame_bytes_max: 1024,
            ..StreamConfig::default()
        };
        let options = common::log_options("suite", config);
        let (log, _) = Log::open(Arc::clone(&self.file_system), directory.path(), options)
            .expect("opening the log");
        let log = Arc::new(log);
        let state_machine = StreamStateMachine::open(
            Arc::clone(&log),
            Arc::clone(&self.file_system),
            Default::default(),
        )
        .expect("opening the state machine");
        Ok((directory, StreamLogStore::new(log), state_machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_on_the_segment_store() {
    let builder = OnDisk {
        file_system: Arc::new(OsFileSystem::new(natswal::io::WriteMode::Pwrite)),
    };
    Suite::test_all(builder)
        .await
        .expect("openraft's storage suite");
}
