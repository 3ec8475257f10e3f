//! The configuration file as a source: notices an edit as it happens and says whether the
//! content changed.
//!
//! Owns: the file's content hash (what "changed" means: an edit that restores the old text,
//! or a touch, changes nothing), the inotify watch of the file's directory (so that an
//! editor's rename over the file, and a Kubernetes ConfigMap's symlink swap of `..data`, are
//! seen as well as writes in place), and the short settle after an event (an editor's
//! truncate-then-write arrives as several events; the file is read once they stop).
//! A SIGHUP asks for a reload whatever the hash says (the daemon's part). Where inotify is
//! not available the daemon's once-a-second check still finds every edit.
//!
//! Must not know: what the configuration means, snapshots, the daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use inotify::{EventStream, Inotify, WatchMask};
use xxhash_rust::xxh3::xxh3_64;

use crate::config::{Config, ConfigError};

/// How long the directory must stay quiet after an event before the file is read.
pub const SETTLE: Duration = Duration::from_millis(20);

/// A configuration's content hash as `xlb_config_hash` shows it and `xlb check` prints it:
/// xxh3-64 of the file's bytes, cut to 48 bits (exact in a Prometheus gauge's float64).
#[must_use]
pub fn content_hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes) & ((1 << 48) - 1)
}

/// A new configuration read from the file.
#[derive(Debug)]
pub struct Read {
    /// The configuration, or why it was refused.
    pub config: Result<Config, ConfigError>,
    /// Its content hash.
    pub hash: u64,
}

/// The file, its last content hash, and the watch of its directory.
pub struct FileSource {
    path: PathBuf,
    hash: Option<u64>,
    events: Option<EventStream<[u8; 4096]>>,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("hash", &self.hash)
            .field("watched", &self.events.is_some())
            .finish()
    }
}

impl FileSource {
    /// Watches `path`, whose content hashed to `hash` when it was loaded. Must run inside
    /// a tokio runtime. Without inotify (a full instance table, say) it watches nothing and
    /// says why; [`FileSource::read_if_changed`] still works.
    #[must_use]
    pub fn new(path: &Path, hash: Option<u64>) -> (Self, Option<String>) {
        let (events, why) = match watch(path) {
            Ok(e) => (Some(e), None),
            Err(e) => (None, Some(e.to_string())),
        };
        (
            Self {
                path: path.to_owned(),
                hash,
                events,
            },
            why,
        )
    }

    /// Waits for an event in the file's directory, then for it to settle ([`SETTLE`]).
    /// Pending forever without a watch. Cancel-safe.
    pub async fn changed(&mut self) {
        let Some(events) = self.events.as_mut() else {
            return std::future::pending().await;
        };
        if events.next().await.is_none() {
            self.events = None;
            return std::future::pending().await;
        }
        // The rest of a burst (an editor's several writes, a ConfigMap's swap).
        while let Ok(Some(_)) = tokio::time::timeout(SETTLE, events.next()).await {}
    }

    /// Reads the file if its content differs from the last read (or if `force`): `None` when
    /// unchanged or unreadable (an unreadable file keeps the last configuration, and is
    /// reported once, by its hash of nothing).
    pub fn read_if_changed(&mut self, force: bool) -> Option<Read> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                let hash = Some(content_hash(&[]));
                if self.hash != hash {
                    self.hash = hash;
                    return Some(Read {
                        config: Err(ConfigError::Unreadable {
                            path: self.path.clone(),
                            reason: e.to_string(),
                        }),
                        hash: 0,
                    });
                }
                return None;
            }
        };
        let hash = content_hash(&bytes);
        if !force && self.hash == Some(hash) {
            return None;
        }
        self.hash = Some(hash);
        let config = Config::parse_file(&self.path, &bytes);
        Some(Read { config, hash })
    }
}

/// An event stream of the directory holding `path`: files written, created, moved in or
/// out, deleted (the file itself may be a symlink the swap replaces).
fn watch(path: &Path) -> std::io::Result<EventStream<[u8; 4096]>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let inotify = Inotify::init()?;
    inotify.watches().add(
        &dir,
        WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB,
    )?;
    inotify.into_event_stream([0u8; 4096])
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "interfaces: [a]\nservices:\n  - { name: web, vip: 198.18.64.1, ports: [{ port: 80 }], backends: [{ address: 198.18.128.1 }] }\n";

    /// A fresh directory, removed when dropped (a failing test too).
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    fn dir() -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "xlb-file-source-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    /// Waits for `changed` (at most 2 s) and returns how long it took.
    async fn noticed(source: &mut FileSource) -> Duration {
        let t = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(2), source.changed())
            .await
            .expect("the edit was noticed within 2 s");
        t.elapsed()
    }

    #[tokio::test]
    async fn an_edit_in_place_is_noticed_at_once_and_only_a_content_change_counts() {
        let d = dir();
        let path = d.join("xlb.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let (mut source, why) = FileSource::new(&path, Some(content_hash(GOOD.as_bytes())));
        assert!(why.is_none(), "{why:?}");
        assert!(
            source.read_if_changed(false).is_none(),
            "nothing changed yet"
        );

        let edited = GOOD.replace("198.18.128.1", "198.18.128.2");
        std::fs::write(&path, &edited).unwrap();
        assert!(noticed(&mut source).await < Duration::from_millis(500));
        let read = source.read_if_changed(false).expect("a change");
        assert_eq!(read.hash, content_hash(edited.as_bytes()));
        assert!(read.config.is_ok());

        // Touching it, or writing the same text, changes nothing; SIGHUP's force reads.
        std::fs::write(&path, &edited).unwrap();
        noticed(&mut source).await;
        assert!(source.read_if_changed(false).is_none());
        assert!(source.read_if_changed(true).is_some());
    }

    #[tokio::test]
    async fn a_configmap_symlink_swap_is_noticed_and_read_through_the_links() {
        // What the kubelet does: xlb.yaml -> ..data/xlb.yaml, ..data -> ..2026_1; an update
        // writes ..2026_2 and renames a new ..data symlink over the old one.
        let d = dir();
        let v1 = d.join("..2026_1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::write(v1.join("xlb.yaml"), GOOD).unwrap();
        std::os::unix::fs::symlink("..2026_1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/xlb.yaml", d.join("xlb.yaml")).unwrap();
        let path = d.join("xlb.yaml");
        let (mut source, _) = FileSource::new(&path, Some(content_hash(GOOD.as_bytes())));

        let v2 = d.join("..2026_2");
        std::fs::create_dir(&v2).unwrap();
        let edited = GOOD.replace("web", "shop");
        std::fs::write(v2.join("xlb.yaml"), &edited).unwrap();
        std::os::unix::fs::symlink("..2026_2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(&v1).unwrap();

        assert!(noticed(&mut source).await < Duration::from_millis(500));
        let read = source
            .read_if_changed(false)
            .expect("the swap changed the content");
        assert_eq!(read.config.unwrap().services[0].name, "shop");
    }

    #[tokio::test]
    async fn a_broken_edit_is_reported_once_and_the_fix_is_read() {
        let d = dir();
        let path = d.join("xlb.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let (mut source, _) = FileSource::new(&path, Some(content_hash(GOOD.as_bytes())));
        std::fs::write(&path, "services: [ { name: broken, vip: nope } ]\n").unwrap();
        noticed(&mut source).await;
        assert!(source.read_if_changed(false).unwrap().config.is_err());
        assert!(source.read_if_changed(false).is_none(), "reported once");
        std::fs::remove_file(&path).unwrap();
        noticed(&mut source).await;
        assert!(
            source.read_if_changed(false).unwrap().config.is_err(),
            "gone"
        );
        assert!(source.read_if_changed(false).is_none(), "reported once");
        std::fs::write(&path, GOOD).unwrap();
        noticed(&mut source).await;
        assert!(source.read_if_changed(false).unwrap().config.is_ok());
    }

    /// A reload's refusal reads as `xlb check`'s and `xlb run`'s (`Config::load`) for the same
    /// file: the same error, not merely the same kind.
    #[tokio::test]
    async fn a_reload_refuses_a_bad_file_with_the_words_of_check_and_run() {
        let d = dir();
        let path = d.join("xlb.yaml");
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/xlb.yaml"
        ))
        .unwrap();
        for bad in [
            example.replacen("weight: 2", "weight: -2", 1).into_bytes(),
            example
                .replacen("mode:", "mode: sideways\nx:", 1)
                .into_bytes(),
            example
                .replacen("flow_capacity:", "flow_capacity: 1\ny:", 1)
                .into_bytes(),
            b"interfaces: [\xff]\n".to_vec(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let (mut source, _) = FileSource::new(&path, None);
            let reload = source.read_if_changed(true).unwrap().config.unwrap_err();
            let load = Config::load(&path).unwrap_err();
            assert_eq!(reload, load);
            assert!(reload.to_string().contains("xlb.yaml"), "{reload}");
        }
        std::fs::remove_file(&path).unwrap();
        let (mut source, _) = FileSource::new(&path, None);
        let gone = source.read_if_changed(true).unwrap().config.unwrap_err();
        assert_eq!(gone, Config::load(&path).unwrap_err());
    }
}
