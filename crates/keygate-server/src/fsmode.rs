//! Files that hold secrets are private to the account that runs Keygate: directories 0700, files 0600.
//!
//! SQLite creates `-wal` and `-shm` later, with the mode of the database file, so creating the database
//! file 0600 before SQLite opens it keeps them private too. Existing files and directories that other
//! accounts can read are tightened, with a warning; if that fails, Keygate refuses to start.

use std::fs::File;
use std::io;
use std::path::Path;

/// Creates `dir` (and parents) private, or tightens an existing one. Returns the old mode if it changed.
pub fn make_private_dir(dir: &Path) -> io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !dir.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            return Ok(None);
        }
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            return Ok(Some(mode));
        }
        Ok(None)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir).map(|()| None)
    }
}

/// Makes an existing file 0600 if others can read it. Returns the old mode if it changed.
pub fn make_private_file(path: &Path) -> io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            return Ok(Some(mode));
        }
        Ok(None)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(None)
    }
}

/// Can every account read this file?
pub fn world_readable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// Creates a new file that only its owner can read, failing if it exists.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// Makes the database file and its companions private, creating the database file (empty, 0600) if it
/// does not exist yet, so that SQLite's `-wal` and `-shm` inherit its mode.
pub fn prepare_database_files(db: &Path) -> io::Result<Vec<(String, u32)>> {
    let mut tightened = Vec::new();
    if !db.exists() {
        match create_private_file(db) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = Path::new(&name);
        if path.exists()
            && let Some(old) = make_private_file(path)?
        {
            tightened.push((path.display().to_string(), old));
        }
    }
    Ok(tightened)
}
