use datafusion::error::DataFusionError;
use spanlake_engine::ErrorKind;

use crate::memory::PER_QUERY_SETTING;

/// Errors of the query layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The statement is not a read query, and only reads are allowed here.
    #[error(
        "{what} is not allowed: only read queries (SELECT, WITH, VALUES, EXPLAIN, SHOW) are accepted"
    )]
    Forbidden {
        /// What was refused.
        what: String,
    },
    /// The query ran longer than allowed.
    #[error("query cancelled after the time limit of {limit:?}")]
    Timeout {
        /// The limit.
        limit: std::time::Duration,
    },
    /// The SQL text is empty.
    #[error("empty SQL statement")]
    Empty,
    /// More than one statement in one request.
    #[error("exactly one SQL statement per request is accepted, got {count}")]
    MultipleStatements {
        /// Statements found.
        count: usize,
    },
    /// Planning or executing the query failed.
    #[error("{source}")]
    Query {
        /// The cause.
        #[source]
        source: DataFusionError,
    },
    /// A request that is not valid (a bad trace id, an empty predicate, ...).
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
    },
    /// The storage engine failed.
    #[error("{source}")]
    Storage {
        /// The cause.
        #[source]
        source: spanlake_engine::Error,
    },
    /// Encoding the result failed.
    #[error("failed to encode result")]
    Encode {
        /// The cause.
        #[source]
        source: arrow::error::ArrowError,
    },
}

impl From<DataFusionError> for Error {
    fn from(source: DataFusionError) -> Self {
        Self::Query { source }
    }
}

impl Error {
    /// The kind of failure, for status mapping.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Forbidden { .. } | Self::Empty | Self::MultipleStatements { .. } => {
                ErrorKind::InvalidInput
            }
            Self::Timeout { .. } => ErrorKind::Overloaded,
            Self::Query { source } => match source.find_root() {
                DataFusionError::SQL(..)
                | DataFusionError::Plan(_)
                | DataFusionError::SchemaError(..)
                | DataFusionError::NotImplemented(_)
                | DataFusionError::Configuration(_) => ErrorKind::InvalidInput,
                // Over the per-query cap the query cannot run as written: retrying won't help.
                DataFusionError::ResourcesExhausted(m) if m.contains(PER_QUERY_SETTING) => {
                    ErrorKind::InvalidInput
                }
                DataFusionError::ResourcesExhausted(_) => ErrorKind::Overloaded,
                DataFusionError::Execution(_) | DataFusionError::ArrowError(..) => {
                    // Casts of bad literals, division by zero and similar: the query's fault.
                    ErrorKind::InvalidInput
                }
                _ => ErrorKind::Internal,
            },
            Self::BadRequest { .. } => ErrorKind::InvalidInput,
            Self::Storage { source } => source.kind(),
            Self::Encode { .. } => ErrorKind::Internal,
        }
    }
}

/// Result type of the query layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
