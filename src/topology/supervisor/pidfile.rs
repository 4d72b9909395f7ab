//! `--pid-file PATH`: the supervisor's pid, written atomically (a
//! temporary file renamed over PATH) and removed at a clean stop.
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A written pid file; [`PidFile::remove`] takes it away.
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes `pid` to `path` atomically.
    pub fn write(path: &Path, pid: u32) -> io::Result<PidFile> {
        let what = |e: io::Error| io::Error::new(e.kind(), format!("--pid-file {}: {e}", path.display()));
        let tmp = path
            .with_file_name(format!(".{}.{pid}.tmp", path.file_name().map_or("pid".into(), |n| n.to_string_lossy())));
        let mut f = std::fs::File::create(&tmp).map_err(what)?;
        f.write_all(format!("{pid}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(what)?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(what(e));
        }
        Ok(PidFile { path: path.to_path_buf() })
    }

    /// Removes the file if it still names us (an operator may have started
    /// another instance with the same path since).
    pub fn remove(self) {
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .is_some_and(|p| p == std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
