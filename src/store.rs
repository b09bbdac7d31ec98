//! Store: the streams of one data directory (`<data_dir>/streams/<name>`),
//! sharing one file system and one bounded cache of open segment files.

use crate::error::{Error, Result};
use crate::io::os::OsFileSystem;
use crate::io::{FileSystem, WriteMode};
use crate::log::cache::SegmentCache;
use crate::log::recovery::RecoveryReport;
use crate::stream::{validate_stream_name, Stream, StreamOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Default number of sealed segments open at once, across all streams.
pub const OPEN_SEGMENTS_MAX_DEFAULT: usize = 256;

pub struct Store {
    file_system: Arc<dyn FileSystem>,
    root: PathBuf,
    cache: Arc<SegmentCache>,
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
        file_system.create_directory(&root.join("streams"))?;
        Ok(Store {
            file_system,
            root: root.to_path_buf(),
            cache: Arc::new(SegmentCache::new(open_segments_max)),
            streams: Mutex::new(BTreeMap::new()),
        })
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
        let mut first_error = None;
        for stream in streams.values() {
            if let Err(error) = stream.close() {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
