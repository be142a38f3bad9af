//! Key material at rest: the master key (a key-encryption key kept outside the database) and sealing
//! with XChaCha20-Poly1305.
//!
//! Policy:
//! - JWT signing keys are stored sealed: `KGS1 ‖ 24-byte random nonce ‖ ciphertext+tag`, with the key id
//!   as associated data, so a sealed key cannot be moved to another row.
//! - The master key is 32 random bytes, base64 in `KEYGATE_MASTER_KEY`, or in a file (mode 0600, created
//!   on first start if missing). It never lives in the database or the data directory: a copy of the
//!   data directory (a backup, a stolen disk image) does not open the signing keys.
//! - A wrong master key is an error at start, never a silent regeneration of keys.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const MAGIC: &[u8; 4] = b"KGS1";
const NONCE_LEN: usize = 24;

/// Where the master key comes from.
#[derive(Clone, Default)]
pub enum MasterKeySource {
    /// A file beside the data directory: `<data_dir>.master-key` (created if missing).
    #[default]
    BesideDataDir,
    /// This file (created if missing).
    File(PathBuf),
    /// The key itself, base64 (from `KEYGATE_MASTER_KEY`).
    Inline(String),
}

impl std::fmt::Debug for MasterKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MasterKeySource::BesideDataDir => f.write_str("BesideDataDir"),
            MasterKeySource::File(p) => write!(f, "File({})", p.display()),
            MasterKeySource::Inline(_) => f.write_str("Inline(<redacted>)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the master key must be 32 bytes in standard base64 (make one with `openssl rand -base64 32`)")]
    BadKey,
    #[error("cannot read or create the master key file {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("cannot read random bytes from the operating system: {0}")]
    Random(getrandom::Error),
    #[error(
        "the master key file {0} is inside the data directory; keep it apart (set master_key_file or \
         KEYGATE_MASTER_KEY), or a copy of the data directory reveals the signing keys"
    )]
    InsideDataDir(PathBuf),
    #[error(
        "the master key file {0} is readable by every account and cannot be made private; fix its mode (0600)"
    )]
    WorldReadable(PathBuf),
    #[error(
        "stored key material does not open with this master key: the master key is not the one it was \
         sealed with (check KEYGATE_MASTER_KEY / master_key_file), or the data was altered"
    )]
    WrongKey,
}

/// The key-encryption key. Its `Debug` never shows it.
pub struct MasterKey {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// The file a `BesideDataDir` master key lives in: `<data dir>.master-key`, next to the directory (the
/// directory's real path is used, so `--data-dir .` still puts it outside).
pub fn default_key_path(data_dir: &Path) -> PathBuf {
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let name = dir.file_name().map_or_else(|| "keygate-data".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!("{name}.master-key"))
}

/// Is `path` inside `dir` (after resolving both)?
fn inside(path: &Path, dir: &Path) -> bool {
    let (Ok(dir), Some(parent)) = (std::fs::canonicalize(dir), path.parent()) else { return false };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    std::fs::canonicalize(parent).is_ok_and(|p| p.starts_with(&dir))
}

impl MasterKey {
    pub fn from_base64(s: &str) -> Result<Self, SealError> {
        let bytes = STANDARD.decode(s.trim()).map_err(|_| SealError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| SealError::BadKey)?;
        Ok(MasterKey { cipher: XChaCha20Poly1305::new(&key.into()) })
    }

    /// Opens the master key named by `source`, creating its file (0600) if it does not exist. Returns
    /// the key and, if it was created now, the file's path.
    pub fn open(source: &MasterKeySource, data_dir: &Path) -> Result<(Self, Option<PathBuf>), SealError> {
        let path = match source {
            MasterKeySource::Inline(s) => return Ok((Self::from_base64(s)?, None)),
            MasterKeySource::File(p) => p.clone(),
            MasterKeySource::BesideDataDir => default_key_path(data_dir),
        };
        if inside(&path, data_dir) {
            return Err(SealError::InsideDataDir(path));
        }
        let file_err = |source| SealError::File { path: path.clone(), source };
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                // Tighten what others can read; a file we may not change (a read-only secret mount, a
                // root-owned 0640 file) is fine unless every account can read it.
                if let Err(e) = crate::fsmode::make_private_file(&path) {
                    if crate::fsmode::world_readable(&path) {
                        return Err(SealError::WorldReadable(path));
                    }
                    tracing::warn!(path = %path.display(), error = %e, "cannot make the master key file private (0600)");
                }
                Ok((Self::from_base64(&s)?, None))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(SealError::Random)?;
                let mut f = crate::fsmode::create_private_file(&path).map_err(file_err)?;
                writeln!(f, "{}", STANDARD.encode(key)).and_then(|()| f.sync_all()).map_err(file_err)?;
                Ok((MasterKey { cipher: XChaCha20Poly1305::new(&key.into()) }, Some(path)))
            }
            Err(e) => Err(file_err(e)),
        }
    }

    /// Seals `plain`, bound to `context` (e.g. a key id).
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(SealError::Random)?;
        let ct = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: context })
            .map_err(|_| SealError::WrongKey)?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + ct.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens what [`MasterKey::seal`] made with the same `context`.
    pub fn unseal(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let rest = sealed.strip_prefix(MAGIC.as_slice()).ok_or(SealError::WrongKey)?;
        if rest.len() < NONCE_LEN {
            return Err(SealError::WrongKey);
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        self.cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: context })
            .map_err(|_| SealError::WrongKey)
    }

    /// Was this stored blob sealed (as opposed to key material stored in clear by an older version)?
    pub fn is_sealed(blob: &[u8]) -> bool {
        blob.starts_with(MAGIC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_binding() {
        let k = MasterKey::from_base64(&STANDARD.encode([7u8; 32])).unwrap();
        let sealed = k.seal(b"kid1", b"private key").unwrap();
        assert!(MasterKey::is_sealed(&sealed));
        assert!(!sealed.windows(11).any(|w| w == b"private key"));
        assert_eq!(k.unseal(b"kid1", &sealed).unwrap(), b"private key");
        assert!(matches!(k.unseal(b"kid2", &sealed), Err(SealError::WrongKey)), "bound to its context");
        let other = MasterKey::from_base64(&STANDARD.encode([8u8; 32])).unwrap();
        assert!(matches!(other.unseal(b"kid1", &sealed), Err(SealError::WrongKey)));
        assert!(matches!(MasterKey::from_base64("c2hvcnQ="), Err(SealError::BadKey)));
        assert!(format!("{k:?}").contains("redacted"));
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (k1, created) = MasterKey::open(&MasterKeySource::BesideDataDir, &data).unwrap();
        let path = created.expect("created on first use");
        assert_eq!(path, dir.path().join("data.master-key"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let (k2, again) = MasterKey::open(&MasterKeySource::BesideDataDir, &data).unwrap();
        assert!(again.is_none());
        // A key file inside the data directory is refused.
        std::fs::create_dir_all(&data).unwrap();
        let inner = MasterKeySource::File(data.join("master.key"));
        assert!(matches!(MasterKey::open(&inner, &data), Err(SealError::InsideDataDir(_))));
        let sealed = k1.seal(b"x", b"y").unwrap();
        assert_eq!(k2.unseal(b"x", &sealed).unwrap(), b"y");
    }
}
