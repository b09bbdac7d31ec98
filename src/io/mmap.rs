//! Segment writes by copying into a shared writable map; `msync(MS_SYNC)`
//! makes a range durable. The file is preallocated before it is mapped, so a
//! store into the map cannot meet a full disk (which would raise SIGBUS).

use super::os::ReadOnlyMap;
use super::{ReadableFile, WritableFile};
use crate::error::{Error, Result};
use memmap2::MmapRaw;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) struct MmapFile {
    file: File,
    path: PathBuf,
    map: Arc<MmapRaw>,
    capacity: u64,
}

impl MmapFile {
    pub(crate) fn new(file: File, path: &Path, capacity_bytes: u64) -> Result<MmapFile> {
        let map = memmap2::MmapOptions::new()
            .len(capacity_bytes as usize)
            .map_raw(&file)
            .map_err(|error| Error::io(format!("cannot map {}", path.display()), error))?;
        Ok(MmapFile {
            file,
            path: path.to_path_buf(),
            map: Arc::new(map),
            capacity: capacity_bytes,
        })
    }

    fn check(&self, start: u64, end: u64) -> Result<()> {
        super::check_range(start, end, self.capacity)
    }
}

impl WritableFile for MmapFile {
    fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()> {
        self.check(position, position + bytes.len() as u64)?;
        // SAFETY: the destination range lies inside the map (checked above);
        // only the stream's single writer thread writes, and only at or above
        // the published position, which no reader slice covers.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(position as usize),
                bytes.len(),
            );
        }
        Ok(())
    }

    fn zero_range(&self, start: u64, end: u64) -> Result<()> {
        self.check(start, end)?;
        // SAFETY: inside the map (checked above); zeroing only happens above
        // the published position (truncating unpublished or torn bytes).
        unsafe {
            std::ptr::write_bytes(
                self.map.as_mut_ptr().add(start as usize),
                0,
                (end - start) as usize,
            );
        }
        Ok(())
    }

    fn sync_range(&self, start: u64, end: u64) -> Result<()> {
        self.check(start, end)?;
        if start == end {
            return Ok(());
        }
        self.map
            .flush_range(start as usize, (end - start) as usize)
            .map_err(|error| {
                Error::io(
                    format!("msync of {} [{start}, {end}) failed", self.path.display()),
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

    fn prepare_range(&self, start: u64, end: u64) {
        let end = end.min(self.capacity);
        if start < end {
            // A hint: on kernels without MADV_POPULATE_WRITE the writer
            // simply takes the page faults itself.
            let _ = self.map.advise_range(
                memmap2::Advice::PopulateWrite,
                start as usize,
                (end - start) as usize,
            );
        }
    }

    fn view(&self) -> Arc<dyn ReadableFile> {
        Arc::new(ReadOnlyMap::from_map(Arc::clone(&self.map), self.capacity))
    }
}
