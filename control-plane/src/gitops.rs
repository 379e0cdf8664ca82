//! `--policies-dir`: a directory of policy files is the source of truth. A change is applied
//! when the files load as a whole; an invalid state is logged, counted and shown in `status`,
//! and the last good set stays in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sidewall_policies::load::{LoadOptions, load_paths};
use tokio::sync::watch;

use crate::api::Api;
use crate::store::PolicyFile;

/// How often the directory is checked.
const POLL: Duration = Duration::from_secs(1);

/// The files under `dir` (recursively, *.yaml/*.yml), as (name relative to dir, text).
fn read_files(dir: &std::path::Path) -> std::io::Result<Vec<PolicyFile>> {
    fn walk(
        base: &std::path::Path,
        path: &std::path::Path,
        out: &mut Vec<PolicyFile>,
    ) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            let name = entry
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            if entry.is_dir() {
                walk(base, &entry, out)?;
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                let relative = entry
                    .strip_prefix(base)
                    .unwrap_or(&entry)
                    .display()
                    .to_string();
                out.push(PolicyFile {
                    name: relative,
                    text: std::fs::read_to_string(&entry)?,
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// Watches `dir` until `stop` turns true.
pub async fn watch(api: Arc<Api>, dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let mut last: Option<Vec<PolicyFile>> = None;
    loop {
        match read_files(&dir) {
            Ok(files) if Some(&files) != last.as_ref() => {
                let (_, _, _, in_force) = api.distribution.current();
                match load_paths(&[&dir], &LoadOptions::default()) {
                    Ok(_) if files == in_force => {
                        api.distribution.set_source_error(None);
                    }
                    Ok(loaded) => {
                        let by = format!("gitops:{}", dir.display());
                        match crate::api::apply_from_source(
                            &api,
                            files.clone(),
                            loaded.policies,
                            by,
                        )
                        .await
                        {
                            Ok(version) => {
                                api.distribution.set_source_error(None);
                                tracing::info!(version, dir = %dir.display(), "policy directory applied");
                            }
                            Err(error) => {
                                tracing::error!(%error, "applying the policy directory failed")
                            }
                        }
                    }
                    Err(errors) => {
                        metrics::counter!("sidewall_control_plane_policy_source_errors_total")
                            .increment(1);
                        tracing::error!(dir = %dir.display(), %errors, "policy directory is invalid; the last good set stays in force");
                        api.distribution.set_source_error(Some(errors.to_string()));
                    }
                }
                last = Some(files);
            }
            Ok(_) => {}
            Err(error) => {
                api.distribution
                    .set_source_error(Some(format!("{}: {error}", dir.display())));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
    }
}
