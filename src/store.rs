//! Store: the streams of one data directory (`<data_dir>/streams/<name>`),
//! sharing one file system, one bounded cache of open segment files and one
//! [`IoPool`] that runs the write and sync work of all of them (a stream
//! costs no thread of its own; see docs/OPERATIONS.md, "I/O threads").

use crate::error::{Error, Result};
use crate::io::handles::HandleLimit;
use crate::io::os::OsFileSystem;
use crate::io::{DirectoryLock, FileSystem, StoreLocked, WriteMode};
use crate::log::cache::SegmentCache;
use crate::log::group_sync::GroupSync;
use crate::log::recovery::RecoveryReport;
use crate::pool::IoPool;
use crate::stream::{validate_stream_name, Driver, Stream, StreamOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Default number of sealed segments open at once, across all streams.
pub const OPEN_SEGMENTS_MAX_DEFAULT: usize = 256;

/// Streams a server opens, and [`Store::close`] closes, at once.
pub const PARALLELISM: usize = 16;

pub struct Store {
    file_system: Arc<dyn FileSystem>,
    /// Bounds the descriptors of every stream's data files.
    handles: Arc<HandleLimit>,
    /// The exclusive lock of `<root>/streams`: the streams need none of
    /// their own (an offline tool takes it shared).
    _lock: DirectoryLock,
    root: PathBuf,
    cache: Arc<SegmentCache>,
    /// Runs every stream opened with [`Driver::Threads`] (the default).
    pool: Arc<IoPool>,
    /// One sync of the file system for the streams waiting at once (none:
    /// each stream syncs its own files).
    group_sync: Option<Arc<GroupSync>>,
    streams: Mutex<BTreeMap<String, Arc<Stream>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Store")
            .field("root", &self.root)
            .finish()
    }
}

impl Store {
    /// A store on the real file system.
    pub fn open(root: &Path, write_mode: WriteMode, open_segments_max: usize) -> Result<Store> {
        Store::with_file_system(
            Arc::new(OsFileSystem::new(write_mode)),
            root,
            open_segments_max,
        )
    }

    /// A store on any file system (the in-memory one in tests).
    pub fn with_file_system(
        file_system: Arc<dyn FileSystem>,
        root: &Path,
        open_segments_max: usize,
    ) -> Result<Store> {
        let streams_directory = root.join(crate::log::recovery::STREAMS_DIRECTORY);
        file_system.create_directory(&streams_directory)?;
        let lock = file_system.lock_directory(&streams_directory)?;
        // Opened before any stream writes: it reports every write-back
        // error from now on.
        let group_sync = match file_system.file_system_sync(&streams_directory)? {
            Some(syncer) => Some(Arc::new(GroupSync::start(syncer)?)),
            None => None,
        };
        let handles = Arc::new(HandleLimit::new(
            file_system,
            crate::io::handles::OPEN_FILES_MAX_DEFAULT,
        ));
        Ok(Store {
            file_system: Arc::clone(&handles) as Arc<dyn FileSystem>,
            handles,
            _lock: lock,
            root: root.to_path_buf(),
            cache: Arc::new(SegmentCache::new(open_segments_max)),
            pool: IoPool::new("natswal-io", crate::pool::default_threads())?,
            group_sync,
            streams: Mutex::new(BTreeMap::new()),
        })
    }

    /// Runs the streams on `threads` I/O threads instead of the default
    /// ([`crate::pool::default_threads`]); before any stream is opened.
    pub fn with_io_threads(mut self, threads: usize) -> Result<Store> {
        if !self.streams().is_empty() {
            return Err(Error::InvalidInput(
                "the I/O threads are set before any stream is opened".to_string(),
            ));
        }
        self.pool = IoPool::new("natswal-io", threads)?;
        Ok(self)
    }

    /// Keeps at most `open_files_max` data files open at once, across all
    /// streams (clean ones are closed and reopened on demand); before any
    /// stream is opened.
    pub fn with_open_files_max(mut self, open_files_max: usize) -> Result<Store> {
        if !self.streams().is_empty() {
            return Err(Error::InvalidInput(
                "the open files limit is set before any stream is opened".to_string(),
            ));
        }
        let inner = Arc::clone(self.handles.inner());
        self.handles = Arc::new(HandleLimit::new(inner, open_files_max));
        self.file_system = Arc::clone(&self.handles) as Arc<dyn FileSystem>;
        Ok(self)
    }

    /// Syncs every stream's files on its own instead of in groups (see
    /// [`crate::log::group_sync`]); before any stream is opened.
    pub fn without_group_sync(mut self) -> Result<Store> {
        if !self.streams().is_empty() {
            return Err(Error::InvalidInput(
                "group sync is set before any stream is opened".to_string(),
            ));
        }
        self.group_sync = None;
        Ok(self)
    }

    /// The group syncer, if the streams sync in groups.
    pub fn group_sync(&self) -> Option<&Arc<GroupSync>> {
        self.group_sync.as_ref()
    }

    /// The bound on open data files.
    pub fn handles(&self) -> &Arc<HandleLimit> {
        &self.handles
    }

    /// The pool that runs the streams' write and sync work.
    pub fn pool(&self) -> &Arc<IoPool> {
        &self.pool
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cache(&self) -> &Arc<SegmentCache> {
        &self.cache
    }

    pub fn file_system(&self) -> &Arc<dyn FileSystem> {
        &self.file_system
    }

    /// Directory of a stream.
    pub fn stream_directory(&self, name: &str) -> PathBuf {
        self.root.join("streams").join(name)
    }

    /// Names of the streams stored on disk.
    pub fn stored_stream_names(&self) -> Result<Vec<String>> {
        Ok(self
            .file_system
            .list(&self.root.join("streams"))?
            .into_iter()
            .filter(|name| validate_stream_name(name).is_ok())
            .filter(|name| self.file_system.is_directory(&self.stream_directory(name)))
            .collect())
    }

    /// Opens (or creates) a stream; a stream is opened once per store.
    pub fn open_stream(
        &self,
        name: &str,
        options: StreamOptions,
    ) -> Result<(Arc<Stream>, RecoveryReport)> {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if streams.contains_key(name) {
            return Err(Error::InvalidInput(format!(
                "stream '{name}' is already open"
            )));
        }
        let directory = self.stream_directory(name);
        let mut options = options;
        if matches!(options.driver, Driver::Threads) {
            options.driver = Driver::Pool(Arc::clone(&self.pool));
        }
        options.store_locked = Some(StoreLocked::new());
        // A stream directory on another file system (a mount, a symlink)
        // is not covered by this store's file system sync.
        let streams_directory = self.root.join(crate::log::recovery::STREAMS_DIRECTORY);
        let same_file_system = !self.file_system.exists(&directory)
            || self
                .file_system
                .same_file_system(&streams_directory, &directory);
        options.group_sync = self.group_sync.clone().filter(|_| same_file_system);
        let (stream, report) = Stream::open(
            Arc::clone(&self.file_system),
            &directory,
            name,
            Arc::clone(&self.cache),
            options,
        )?;
        let stream = Arc::new(stream);
        streams.insert(name.to_string(), Arc::clone(&stream));
        Ok((stream, report))
    }

    pub fn stream(&self, name: &str) -> Option<Arc<Stream>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(name)
            .cloned()
    }

    pub fn streams(&self) -> Vec<Arc<Stream>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Closes every stream; returns the first error after trying them all.
    pub fn close(&self) -> Result<()> {
        let streams = std::mem::take(
            &mut *self
                .streams
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        // Closing syncs and writes a checkpoint and a clean mark per stream:
        // several at once let the file system commit their syncs together
        // (10 000 streams closed one by one took 28 s here).
        let queue = Mutex::new(streams.into_values());
        let first_error = Mutex::new(None);
        let closers = PARALLELISM.min(queue.lock().map_or(1, |queue| queue.len()).max(1));
        std::thread::scope(|scope| {
            for _ in 0..closers {
                scope.spawn(|| loop {
                    let next = queue
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .next();
                    let Some(stream) = next else { break };
                    if let Err(error) = stream.close() {
                        first_error
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .get_or_insert(error);
                    }
                });
            }
        });
        first_error
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .map_or(Ok(()), Err)
    }
}
