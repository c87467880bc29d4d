use spanlake_engine::ErrorKind;

/// Errors of the ingest path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request body could not be decoded.
    #[error(transparent)]
    Decode(#[from] spanlake_proto::Error),
    /// The HTTP content type is not one OTLP defines.
    #[error(
        "unsupported content type {content_type:?}; use application/x-protobuf or application/json"
    )]
    UnsupportedMediaType {
        /// The content type sent.
        content_type: String,
    },
    /// The HTTP content encoding is not supported.
    #[error("unsupported content encoding {encoding:?}; use gzip, zstd or identity")]
    UnsupportedEncoding {
        /// The encoding sent.
        encoding: String,
    },
    /// The body is larger than the configured limit.
    #[error("request body larger than {limit} bytes{}", if *.decompressed { " after decompression" } else { "" })]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
        /// Whether the limit was hit while decompressing.
        decompressed: bool,
    },
    /// The compressed body is corrupt.
    #[error("invalid {encoding} body: {source}")]
    Decompress {
        /// The encoding.
        encoding: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The caller may not do this.
    #[error("{reason}")]
    Unauthorized {
        /// Why.
        reason: String,
    },
    /// The engine refused the data.
    #[error(transparent)]
    Engine(#[from] spanlake_engine::Error),
}

impl Error {
    /// The kind of failure, for status mapping.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Engine(e) => e.kind(),
            Self::Decode(_)
            | Self::UnsupportedMediaType { .. }
            | Self::UnsupportedEncoding { .. }
            | Self::BodyTooLarge { .. }
            | Self::Decompress { .. }
            | Self::Unauthorized { .. } => ErrorKind::InvalidInput,
        }
    }
}

/// Result type of the ingest crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
