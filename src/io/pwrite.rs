//! Segment writes with `pwrite`, durability with `fdatasync`. Reads still go
//! through a shared read-only map: the page cache is the same, so pages
//! written with pwrite are visible in the map.

use super::os::ReadOnlyMap;
use super::{ReadableFile, WritableFile};
use crate::error::{Error, Result};
use memmap2::MmapRaw;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) struct PwriteFile {
    file: File,
    path: PathBuf,
    map: Arc<MmapRaw>,
    capacity: u64,
}

impl PwriteFile {
    pub(crate) fn new(file: File, path: &Path, capacity_bytes: u64) -> Result<PwriteFile> {
        let map = memmap2::MmapOptions::new()
            .len(capacity_bytes as usize)
            .map_raw_read_only(&file)
            .map_err(|error| Error::io(format!("cannot map {}", path.display()), error))?;
        Ok(PwriteFile {
            file,
            path: path.to_path_buf(),
            map: Arc::new(map),
            capacity: capacity_bytes,
        })
    }
}

impl WritableFile for PwriteFile {
    fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()> {
        super::check_range(position, position + bytes.len() as u64, self.capacity)?;
        self.file.write_all_at(bytes, position).map_err(|error| {
            Error::io(
                format!("pwrite to {} at {position} failed", self.path.display()),
                error,
            )
        })
    }

    fn zero_range(&self, start: u64, end: u64) -> Result<()> {
        super::check_range(start, end, self.capacity)?;
        let zeros = vec![0u8; ((end - start) as usize).min(1 << 20)];
        let mut position = start;
        while position < end {
            let chunk = ((end - position) as usize).min(zeros.len());
            self.write_at(position, &zeros[..chunk])?;
            position += chunk as u64;
        }
        Ok(())
    }

    fn sync_range(&self, _start: u64, _end: u64) -> Result<()> {
        self.file.sync_data().map_err(|error| {
            Error::io(
                format!("fdatasync of {} failed", self.path.display()),
                error,
            )
        })
    }

    fn sync_all(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|error| Error::io(format!("fsync of {} failed", self.path.display()), error))
    }

    fn set_length(&self, length_bytes: u64) -> Result<()> {
        self.file.set_len(length_bytes).map_err(|error| {
            Error::io(
                format!("cannot set length of {}", self.path.display()),
                error,
            )
        })
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn view(&self) -> Arc<dyn ReadableFile> {
        Arc::new(ReadOnlyMap::from_map(Arc::clone(&self.map), self.capacity))
    }
}
