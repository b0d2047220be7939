//! Directory watches on inotify, with fsnotify's event mapping (E2B envd
//! uses fsnotify): CREATE/MOVED_TO → create, MODIFY → write, DELETE →
//! remove, MOVED_FROM → rename, ATTRIB → chmod.
//!
//! Each [`Watch`] owns one task reading one inotify instance; dropping the
//! `Watch` aborts the task and closes the instance. Events go into a bounded
//! channel of [`WATCH_BUFFER`]; a full channel blocks the task, and the kernel
//! queue behind it overflows, so a stalled watcher loses events rather than
//! memory. Recursive watches add a watch for every directory that appears.
//!
//! [`Watchers`] keeps the polling watchers (`CreateWatcher`): each buffers at
//! most [`POLL_BUFFER`] events; beyond that the oldest are dropped (logged),
//! and `GetWatcherEvents` drains the buffer.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{entry_info, Entry, FsError};
use crate::users::Accounts;

/// Capacity of a watch's event channel.
pub const WATCH_BUFFER: usize = 256;
/// Events a polling watcher keeps between two polls.
pub const POLL_BUFFER: usize = 4096;
/// Polling watchers alive at once (each holds an inotify instance).
pub const MAX_POLLING_WATCHERS: usize = 256;

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

/// One filesystem event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEvent {
    /// Relative to the watched directory (`sub/file.txt` when recursive).
    pub name: String,
    pub kind: EventKind,
    pub entry: Option<Entry>,
}

/// An event, or the error that ended the watch (always the last item).
pub type WatchItem = Result<FsEvent, String>;

/// A polling watcher not drained for this long is removed.
pub const POLLING_WATCHER_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// What to watch.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub root: PathBuf,
    pub recursive: bool,
    pub include_entry: bool,
    pub allow_network_mounts: bool,
}

/// A running watch.
pub struct Watch {
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const NETWORK_FS: &[i64] = &[
    0x6969,     // NFS
    0xFF534D42, // CIFS
    0xFE534D42, // SMB2
    0x517B,     // SMB
    0x65735546, // FUSE
    0x01021997, // 9P
];

fn is_network_mount(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid C string and a zeroed out-struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } < 0 {
        return false;
    }
    NETWORK_FS.contains(&(st.f_type as i64))
}

/// Reasons a watch cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("path '{}' is on a network mount; set allowNetworkMounts to watch it", .0.display())]
    NetworkMount(PathBuf),
    #[error("watcher '{0}' not found")]
    UnknownWatcher(String),
    #[error(
        "too many watchers: remove one before creating another (limit {MAX_POLLING_WATCHERS})"
    )]
    TooMany,
    #[error("inotify")]
    Inotify(#[source] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

/// Start watching; events arrive on the returned receiver.
pub fn start(
    spec: WatchSpec,
    accounts: Accounts,
) -> Result<(Watch, mpsc::Receiver<WatchItem>), WatchError> {
    let meta =
        std::fs::metadata(&spec.root).map_err(|e| FsError::from_io("stat", &spec.root, e))?;
    if !meta.is_dir() {
        return Err(FsError::NotDir(spec.root.clone()).into());
    }
    if !spec.allow_network_mounts && is_network_mount(&spec.root) {
        return Err(WatchError::NetworkMount(spec.root.clone()));
    }
    let inotify = Inotify::init().map_err(WatchError::Inotify)?;
    let mut dirs = HashMap::new();
    let mut watches = inotify.watches();
    add_tree(
        &mut watches,
        &mut dirs,
        &spec.root,
        Path::new(""),
        spec.recursive,
    )
    .map_err(WatchError::Inotify)?;
    let stream = inotify
        .into_event_stream(vec![0u8; 64 * 1024])
        .map_err(WatchError::Inotify)?;
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let task = tokio::spawn(async move {
        let mut stream = stream;
        let mut watches = stream.watches();
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = tx.send(Err(format!("reading the watch failed: {e}"))).await;
                    return;
                }
            };
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                let _ = tx
                    .send(Err(
                        "too many events: the kernel's queue overflowed and events were lost"
                            .into(),
                    ))
                    .await;
                return;
            }
            if ev.mask.contains(EventMask::IGNORED) {
                dirs.remove(&ev.wd);
                continue;
            }
            let Some(rel_dir) = dirs.get(&ev.wd).cloned() else {
                continue;
            };
            let rel = match &ev.name {
                Some(n) => rel_dir.join(n),
                None if rel_dir.as_os_str().is_empty() => PathBuf::new(),
                // Self-events of subdirectories duplicate the parent's.
                None => continue,
            };
            if spec.recursive
                && ev.mask.contains(EventMask::ISDIR)
                && ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
            {
                let _ = add_tree(&mut watches, &mut dirs, &spec.root.join(&rel), &rel, true);
            }
            let Some(kind) = map_kind(ev.mask) else {
                continue;
            };
            let entry = (spec.include_entry
                && matches!(
                    kind,
                    EventKind::Create | EventKind::Write | EventKind::Chmod
                ))
            .then(|| entry_info(&spec.root.join(&rel), &accounts).ok())
            .flatten();
            let event = FsEvent {
                name: rel.to_string_lossy().into_owned(),
                kind,
                entry,
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    Ok((Watch { task }, rx))
}

fn map_kind(mask: EventMask) -> Option<EventKind> {
    if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
        Some(EventKind::Create)
    } else if mask.intersects(EventMask::MOVED_FROM | EventMask::MOVE_SELF) {
        Some(EventKind::Rename)
    } else if mask.contains(EventMask::ATTRIB) {
        Some(EventKind::Chmod)
    } else if mask.contains(EventMask::MODIFY) {
        Some(EventKind::Write)
    } else if mask.intersects(EventMask::DELETE | EventMask::DELETE_SELF) {
        Some(EventKind::Remove)
    } else {
        None
    }
}

fn add_tree(
    watches: &mut Watches,
    dirs: &mut HashMap<WatchDescriptor, PathBuf>,
    abs: &Path,
    rel: &Path,
    recursive: bool,
) -> std::io::Result<()> {
    let mask = WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::DONT_FOLLOW;
    let wd = watches.add(abs, mask)?;
    dirs.insert(wd, rel.to_path_buf());
    if recursive {
        if let Ok(rd) = std::fs::read_dir(abs) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = add_tree(watches, dirs, &e.path(), &rel.join(e.file_name()), true);
                }
            }
        }
    }
    Ok(())
}

struct Polled {
    _watch: Watch,
    events: Arc<Mutex<Buffered>>,
    collector: JoinHandle<()>,
    drained_at: std::time::Instant,
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.collector.abort();
    }
}

/// A polling watcher's buffer.
#[derive(Default)]
struct Buffered {
    events: VecDeque<FsEvent>,
    error: Option<String>,
}

/// Polling watchers by id.
#[derive(Default)]
pub struct Watchers {
    by_id: Mutex<HashMap<String, Polled>>,
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchers").finish_non_exhaustive()
    }
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Polled>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a polling watcher; returns its id (`w` + random hex).
    pub fn create(&self, spec: WatchSpec, accounts: Accounts) -> Result<String, WatchError> {
        {
            let mut map = self.lock();
            Self::expire(&mut map);
            if map.len() >= MAX_POLLING_WATCHERS {
                return Err(WatchError::TooMany);
            }
        }
        let (watch, mut rx) = start(spec, accounts)?;
        let events = Arc::new(Mutex::new(Buffered::default()));
        let sink = events.clone();
        let collector = tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let mut b = sink.lock().unwrap_or_else(|p| p.into_inner());
                match item {
                    Ok(ev) => {
                        if b.events.len() == POLL_BUFFER {
                            b.events.pop_front();
                            tracing::warn!("polling watcher full; dropped its oldest event");
                        }
                        b.events.push_back(ev);
                    }
                    Err(e) => b.error = Some(e),
                }
            }
        });
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw)
            .map_err(|e| WatchError::Inotify(std::io::Error::other(e.to_string())))?;
        let id = format!(
            "w{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        self.lock().insert(
            id.clone(),
            Polled {
                _watch: watch,
                events,
                collector,
                drained_at: std::time::Instant::now(),
            },
        );
        Ok(id)
    }

    /// Take the events buffered since the last call, or the error that
    /// ended the watcher (once; the watcher is then gone).
    pub fn drain(&self, id: &str) -> Result<Vec<FsEvent>, WatchError> {
        let mut map = self.lock();
        let polled = map
            .get_mut(id)
            .ok_or_else(|| WatchError::UnknownWatcher(id.to_string()))?;
        polled.drained_at = std::time::Instant::now();
        let mut b = polled.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = b.error.take() {
            drop(b);
            map.remove(id);
            return Err(WatchError::Failed(e));
        }
        Ok(b.events.drain(..).collect())
    }

    /// Forget watchers nobody drained for [`POLLING_WATCHER_TTL`] (their
    /// client is most likely gone without removing them).
    fn expire(map: &mut HashMap<String, Polled>) {
        map.retain(|_, p| p.drained_at.elapsed() < POLLING_WATCHER_TTL);
    }

    /// Stop a watcher.
    pub fn remove(&self, id: &str) -> Result<(), WatchError> {
        self.lock()
            .remove(id)
            .map(drop)
            .ok_or_else(|| WatchError::UnknownWatcher(id.to_string()))
    }

    /// Stop every watcher.
    pub fn clear(&self) {
        self.lock().clear();
    }
}
