//! Segments: [`storage::StorageSegment`] is one `.log` file as readers see it
//! (sealed or active), [`writer::SegmentWriter`] appends frames to the active
//! one, [`cache::SegmentCache`] bounds how many sealed segments are mapped.

pub mod cache;
pub mod storage;
pub mod writer;
