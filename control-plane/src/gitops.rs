//! `--policies-dir`: a directory of policy files is the source of truth. A change is applied
//! when the files load as a whole; an invalid state is logged, counted and shown in `status`,
//! and the last good set stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sidewall_policies::load::{LoadOptions, Source, discover_files, load_sources, read_sources};
use tokio::sync::watch;

use crate::api::Api;

/// How often the directory is checked.
const POLL: Duration = Duration::from_secs(1);

/// The policy files under `dir` exactly as the loader finds and reads them (links to
/// directories not walked, each file size-capped), named relative to `dir`. What is validated
/// and what is stored are these same bytes. A file that resolves outside `dir` (a link to a key
/// file, to `/dev/zero`) is refused before it is read, so its contents reach no error message.
fn read_directory(dir: &Path) -> Result<Vec<Source>, String> {
    let root = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let files = discover_files(dir).map_err(|e| e.to_string())?;
    for file in &files {
        let real = file
            .canonicalize()
            .map_err(|e| format!("{}: {e}", file.display()))?;
        if !real.starts_with(&root) {
            return Err(format!(
                "{}: a link to a file outside the policy directory; refused",
                file.display()
            ));
        }
    }
    let sources = read_sources(&files, &LoadOptions::default()).map_err(|e| e.to_string())?;
    Ok(sources
        .into_iter()
        .map(|source| Source {
            name: Path::new(&source.name)
                .strip_prefix(dir)
                .map_or(source.name.clone(), |p| p.display().to_string()),
            text: source.text,
        })
        .collect())
}

/// Watches `dir` until `stop` turns true.
pub async fn watch(api: Arc<Api>, dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let mut last: Option<Result<Vec<Source>, String>> = None;
    loop {
        let read = read_directory(&dir);
        if Some(&read) != last.as_ref() {
            apply_directory(&api, &dir, &read).await;
            last = Some(read);
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Validates what was read and applies it when it differs from the set in force; an invalid
/// directory is logged, counted and shown (`status`, the dashboard), the last good set staying.
async fn apply_directory(api: &Api, dir: &Path, read: &Result<Vec<Source>, String>) {
    let invalid = |error: &str| {
        metrics::counter!(crate::metric::POLICY_SOURCE_ERRORS).increment(1);
        tracing::error!(dir = %dir.display(), %error, "policy directory is invalid; the last good set stays in force");
        api.distribution.set_source_error(Some(error.to_owned()));
    };
    let files = match read {
        Ok(files) => files,
        Err(error) => return invalid(error),
    };
    let loaded = match load_sources(files, &LoadOptions::default()) {
        Ok(loaded) => loaded,
        Err(errors) => return invalid(&errors.to_string()),
    };
    let (_, _, _, in_force) = api.distribution.current();
    if *files == in_force {
        api.distribution.set_source_error(None);
        return;
    }
    let by = format!("gitops:{}", dir.display());
    match crate::api::apply_from_source(api, files.clone(), loaded.policies, by).await {
        Ok(version) => {
            api.distribution.set_source_error(None);
            tracing::info!(version, dir = %dir.display(), "policy directory applied");
        }
        Err(error) => tracing::error!(%error, "applying the policy directory failed"),
    }
}
