//! Where data files live in the object store.
//!
//! ```text
//! spans/project=<project>/date=<YYYY-MM-DD>/hour=<HH>/<uuid-v7>.parquet
//! ```
//!
//! Hive-style partitions by the span's start time (UTC), below a project (tenant) level, so that
//! DuckDB, Spark and Trino read the tree as it is (`hive_partitioning`). File names are UUIDv7,
//! so they sort by creation time and never collide between nodes.

use chrono::{DateTime, Datelike, Timelike, Utc};
use object_store::path::Path;

/// The root prefix of span data files.
pub const SPANS_PREFIX: &str = "spans";

/// The project every span belongs to until projects are configured.
pub const DEFAULT_PROJECT: &str = "default";

/// A time partition: one UTC hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HourPartition {
    /// Hours since the Unix epoch.
    pub epoch_hour: i64,
}

const NS_PER_HOUR: i64 = 3_600_000_000_000;

impl HourPartition {
    /// The partition holding a timestamp in nanoseconds.
    pub fn of_ns(ts_ns: i64) -> Self {
        Self { epoch_hour: ts_ns.div_euclid(NS_PER_HOUR) }
    }

    /// First nanosecond of the hour.
    pub fn start_ns(&self) -> i64 {
        self.epoch_hour.saturating_mul(NS_PER_HOUR)
    }

    /// The directory of this partition for a project.
    pub fn dir(&self, project: &str) -> String {
        let t: DateTime<Utc> = DateTime::from_timestamp(self.epoch_hour.saturating_mul(3600), 0)
            .unwrap_or(DateTime::UNIX_EPOCH);
        format!(
            "{SPANS_PREFIX}/project={project}/date={:04}-{:02}-{:02}/hour={:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour()
        )
    }

    /// A new unique data file path in this partition.
    pub fn new_file_path(&self, project: &str) -> Path {
        Path::from(format!("{}/{}.parquet", self.dir(project), uuid::Uuid::now_v7()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_dir_is_hive_style() {
        // 2026-11-23T21:15:00Z
        let ts = 1_795_468_500_000_000_000_i64;
        let p = HourPartition::of_ns(ts);
        assert_eq!(p.dir("default"), "spans/project=default/date=2026-11-23/hour=21");
        assert!(p.start_ns() <= ts && ts < p.start_ns() + NS_PER_HOUR);
        assert_eq!(HourPartition::of_ns(-1).dir("p"), "spans/project=p/date=1969-12-31/hour=23");
    }
}
