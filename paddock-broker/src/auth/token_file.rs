//! The broker's own service-account token, read from a file that the kubelet rotates. A leaf:
//! `TokenReview` and the pod lookups both present it to the API server.

use std::{
    fs,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

const MAX_TOKEN_FILE: u64 = 64 * 1024;

struct LoadedToken {
    modified: Option<SystemTime>,
    len: u64,
    token: Arc<str>,
}

/// The broker's own token, re-read whenever the file's identity (mtime, size) changes, which
/// covers kubelet's rotation by symlink swap.
pub(crate) struct TokenFile {
    path: PathBuf,
    current: Mutex<Option<LoadedToken>>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl TokenFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            current: Mutex::new(None),
        }
    }

    pub(crate) fn read(&self) -> Result<Arc<str>, String> {
        let path = &self.path;
        let meta = fs::metadata(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
        let stamp = (meta.modified().ok(), meta.len());
        let mut current = self
            .current
            .lock()
            .map_err(|_| "token file state poisoned".to_owned())?;
        if let Some(loaded) = current.as_ref()
            && (loaded.modified, loaded.len) == stamp
        {
            return Ok(Arc::clone(&loaded.token));
        }
        if meta.len() > MAX_TOKEN_FILE {
            return Err(format!("token file {} is too large", path.display()));
        }
        let raw =
            fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
        let token = raw.trim();
        if token.is_empty() || http::HeaderValue::from_str(token).is_err() {
            return Err(format!(
                "token file {} is empty or not a token",
                path.display()
            ));
        }
        let token: Arc<str> = Arc::from(token);
        *current = Some(LoadedToken {
            modified: stamp.0,
            len: stamp.1,
            token: Arc::clone(&token),
        });
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_rereads_on_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        fs::write(&path, "first\n").expect("write");
        let tf = TokenFile::new(path.clone());
        assert_eq!(&*tf.read().expect("read"), "first");
        fs::write(&path, "second-token\n").expect("write");
        assert_eq!(&*tf.read().expect("read"), "second-token");
        assert!(!format!("{tf:?}").contains("second"));
    }
}
