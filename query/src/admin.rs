//! Deletion of spans by predicate (e.g. every span of one user, for a GDPR erasure request).
//!
//! 1. Everything in memory is flushed, so every span acknowledged before the request is in a
//!    committed file.
//! 2. Under the engine's maintenance guard (no compaction or retention removes files
//!    meanwhile), each committed file of the project is asked `count(*) WHERE (predicate)`
//!    through DataFusion (statistics and page indexes skip most of it); each file with matches
//!    is read without them (`WHERE (predicate) IS NOT TRUE`: rows where the predicate is NULL
//!    are kept).
//! 3. All rewritten files replace the old ones in one catalog commit
//!    ([`Engine::replace_files`]): a reader sees every match or none, a crash at any point
//!    loses no other span, and the old files are deleted after the delete delay.
//!
//! The predicate is a SQL boolean expression over the `spans` columns, parsed as an
//! expression only (no statement can be smuggled in).

use std::sync::Arc;

use datafusion::prelude::SessionContext;
use serde::Serialize;
use spanlake_engine::Engine;
use spanlake_engine::catalog::DataFile;
use spanlake_engine::store::SpanStore;

use crate::engine::QueryEngine;
use crate::error::{Error, Result};
use crate::provider::{SpansTable, to_stored};

/// The outcome of a deletion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeleteReport {
    /// Spans deleted.
    pub deleted_spans: u64,
    /// Files rewritten or removed.
    pub files_rewritten: usize,
    /// Files examined.
    pub files_scanned: usize,
}

/// Deletes the spans of `project` (all projects when `None`) matching `predicate`.
pub async fn delete_where(
    engine: &Engine,
    query: &QueryEngine,
    project: Option<&str>,
    predicate: &str,
) -> Result<DeleteReport> {
    if predicate.trim().is_empty() {
        return Err(Error::BadRequest {
            message: "empty predicate: give a WHERE condition".into(),
        });
    }
    let ctx = query.context().clone();
    let store = Arc::clone(engine.store());
    // Check the predicate before touching anything.
    let probe = ctx.read_table(Arc::new(SpansTable::over_files(Arc::clone(&store), Vec::new())))?;
    let expr = probe.parse_sql_expr(predicate)?;
    probe.filter(expr.clone())?.into_optimized_plan()?;

    engine.flush().await.map_err(|source| Error::Storage { source })?;
    let guard = engine.maintenance_guard().await;
    let files: Vec<Arc<DataFile>> =
        store.files().into_iter().filter(|f| project.is_none_or(|p| f.project == p)).collect();
    let mut report = DeleteReport { files_scanned: files.len(), ..Default::default() };
    let mut replacements = Vec::new();
    for f in files {
        let matches = count_matching(&ctx, &store, &f, predicate).await?;
        if matches == 0 {
            continue;
        }
        let keep = ctx.read_table(Arc::new(SpansTable::over_files(
            Arc::clone(&store),
            vec![Arc::clone(&f)],
        )))?;
        let expr = keep.parse_sql_expr(predicate)?;
        let batches = keep.filter(expr.is_not_true())?.collect().await?;
        replacements.push((f, to_stored(&batches)?));
    }
    let replaced = engine
        .replace_files(&guard, replacements)
        .await
        .map_err(|source| Error::Storage { source })?;
    report.deleted_spans = replaced.rows_removed;
    report.files_rewritten = replaced.files_rewritten;
    tracing::info!(predicate, ?project, ?report, "spans deleted");
    Ok(report)
}

/// Rows of `file` for which `predicate` is true.
async fn count_matching(
    ctx: &SessionContext,
    store: &Arc<SpanStore>,
    file: &Arc<DataFile>,
    predicate: &str,
) -> Result<usize> {
    let df = ctx
        .read_table(Arc::new(SpansTable::over_files(Arc::clone(store), vec![Arc::clone(file)])))?;
    let expr = df.parse_sql_expr(predicate)?;
    Ok(df.filter(expr.is_true())?.count().await?)
}
