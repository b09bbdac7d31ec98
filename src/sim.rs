//! Deterministic simulation of the engine (placeholder, filled in below).
