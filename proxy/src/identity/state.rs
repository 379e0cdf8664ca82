//! The state directory: the last good certificate chain, its key (0600) and the trust bundle,
//! so a restart with the control plane down keeps serving until the certificate expires.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use sidewall_policies::SpiffeId;

use super::{Credential, CredentialError};

const CHAIN: &str = "certificate.pem";
const KEY: &str = "key.pem";
const BUNDLE: &str = "trust-bundle.pem";

/// Writes a file atomically with the given mode: a temporary file beside it, under a new
/// random name and created exclusively (`O_EXCL`, so neither a leftover file someone holds open
/// nor a planted link can receive the contents) with at most the final mode, then fsync and
/// rename.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut random = [0u8; 8];
    aws_lc_rs::rand::fill(&mut random).map_err(|_| std::io::Error::other("no randomness"))?;
    let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let temporary = path.with_file_name(format!(".{name}.{suffix}.tmp"));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()?;
            // The umask may have narrowed the mode; the file is ours alone until the rename.
            std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// Saves a credential. The key is written first and the chain last, so a crash leaves either
/// the old pair or a new key with the old chain (refused on load as a mismatch and re-joined).
pub(crate) fn save(dir: &Path, credential: &Credential) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_atomic(&dir.join(BUNDLE), credential.bundle_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join(KEY), credential.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join(CHAIN), credential.chain_pem.as_bytes(), 0o644)
}

/// Loads the saved credential, `None` if there is none.
pub(crate) fn load(dir: &Path, identity: &SpiffeId) -> Result<Option<Credential>, CredentialError> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let (Ok(chain), Ok(key), Ok(bundle)) = (read(CHAIN), read(KEY), read(BUNDLE)) else {
        return Ok(None);
    };
    // A key that does not match the chain (a crash between the two writes) is refused here.
    Credential::from_pem(identity, chain, key, bundle).map(Some)
}
