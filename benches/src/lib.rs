//! Shared data generators for spanlake's benchmarks.
