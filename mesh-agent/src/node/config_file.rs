//! Reading the local config file only when it is whole. A reload that caught a writer half-way
//! once un-enrolled every pod (issue 15), so a file is handed out only when no writer can still
//! be filling it:
//!
//! - With inotify (the normal case) the file's directory is watched. A file written in place
//!   is read only after `IN_CLOSE_WRITE` (its writer closed it), however long the writer pauses;
//!   a file renamed into place (`IN_MOVED_TO`, the documented way to write it) or a symlink swap
//!   in the directory (Kubernetes ConfigMap mounts swap `..data`) is read at once: a rename
//!   publishes a whole file. When the path is a symlink, its target's directory is watched too.
//! - Without inotify (or after its queue overflowed) the file is polled and handed out only when
//!   it read the same twice `settle` apart. That is weaker: a writer that pauses longer than
//!   `settle` in the middle of the file defeats it.
//!
//! The same text is handed out once: a rejected file is not rejected again on every tick.
use std::{
    collections::HashMap,
    ffi::OsString,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
};
use tokio::{io::unix::AsyncFd, time::Instant};
use tracing::{debug, warn};

/// The watched file's next whole content.
pub struct ConfigFile {
    path: PathBuf,
    /// None: polling (no inotify here, or it failed).
    watch: Option<Watch>,
    tick: tokio::time::Interval,
    settle: Duration,
    /// The last text handed out (or read at start).
    last: Option<String>,
    /// Polling: a text read and when, waiting to read the same again `settle` later.
    candidate: Option<(String, Instant)>,
    /// Polling: the file's (mtime, size, inode) when last looked at.
    stamp: Option<Stamp>,
}

type Stamp = (std::time::SystemTime, u64, u64);

/// The inotify side: which directory entry each watch is about, and what its events said.
struct Watch {
    fd: AsyncFd<Notify>,
    /// Watch → its directory and the file name that is ours there.
    names: HashMap<WatchDescriptor, (PathBuf, OsString)>,
    /// The watch on the target's directory (when the path is a symlink elsewhere).
    target: Option<(WatchDescriptor, PathBuf)>,
    /// The file was modified in place and its writer has not closed it yet.
    writing: bool,
    /// Something happened that may have changed the content.
    due: bool,
    /// Events were lost: fall back to the stability check for this change.
    overflowed: bool,
}

/// The inotify instance as tokio's reactor needs it.
struct Notify(Inotify);

impl std::os::fd::AsRawFd for Notify {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.0.as_fd().as_raw_fd()
    }
}

const MASK: AddWatchFlags = AddWatchFlags::IN_MODIFY
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_ONLYDIR);

impl ConfigFile {
    /// Watches `path` (inotify, else polling every `interval`; a polled change must hold for
    /// `settle`).
    pub fn new(path: &Path, interval: Duration, settle: Duration) -> Self {
        let watch = match Watch::new(path) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(file = %path.display(), error = %e,
                    "inotify unavailable: polling the config file; a change is applied once it reads the same twice (weaker: a writer pausing longer than the settle interval is not detected)");
                None
            }
        };
        Self::with_watch(path, watch, interval, settle)
    }

    /// Polling only (no inotify).
    pub fn polling(path: &Path, interval: Duration, settle: Duration) -> Self {
        Self::with_watch(path, None, interval, settle)
    }

    fn with_watch(path: &Path, watch: Option<Watch>, interval: Duration, settle: Duration) -> Self {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            path: path.to_owned(),
            watch,
            tick,
            settle,
            last: None,
            candidate: None,
            stamp: stamp(path),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether changes are seen through inotify (else polled).
    pub fn watching(&self) -> bool {
        self.watch.is_some()
    }

    /// Reads the file now (the first configuration) and remembers the text.
    pub fn read_initial(&mut self) -> std::io::Result<String> {
        let text = std::fs::read_to_string(&self.path)?;
        if let Some(w) = &mut self.watch {
            w.follow_target(&self.path);
        }
        self.last = Some(text.clone());
        Ok(text)
    }

    /// The next whole content that differs from the last one handed out. Cancel-safe: all
    /// state lives in `self`.
    pub async fn next(&mut self) -> String {
        loop {
            let text = match &mut self.watch {
                Some(w) if !w.overflowed => {
                    w.wait(&self.path).await;
                    w.take_whole(&self.path)
                }
                _ => {
                    self.tick.tick().await;
                    self.poll_stable()
                }
            };
            if let Some(text) = text
                && self.last.as_ref() != Some(&text)
            {
                self.last = Some(text.clone());
                return text;
            }
        }
    }

    /// Polling: the text once it read the same `settle` apart (and the stamp did not move).
    fn poll_stable(&mut self) -> Option<String> {
        let now_stamp = stamp(&self.path);
        // After lost events the stamp may not have moved since we last looked: read anyway.
        let lost = self.watch.as_ref().is_some_and(|w| w.overflowed);
        if self.candidate.is_none() && now_stamp == self.stamp && !lost {
            return None;
        }
        let text = std::fs::read_to_string(&self.path).ok();
        let stable = match (&self.candidate, &text) {
            (Some((seen, at)), Some(text)) => {
                seen == text && now_stamp == self.stamp && at.elapsed() >= self.settle
            }
            _ => false,
        };
        if stable {
            self.candidate = None;
            if let Some(w) = &mut self.watch {
                // Back to events once the lost ones are behind us.
                w.overflowed = false;
                w.follow_target(&self.path);
            }
            return text;
        }
        let same = matches!((&self.candidate, &text), (Some((seen, _)), Some(t)) if seen == t);
        if !same || now_stamp != self.stamp {
            self.candidate = text.map(|t| (t, Instant::now()));
        }
        self.stamp = now_stamp;
        None
    }
}

impl Watch {
    fn new(path: &Path) -> nix::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let (dir, name) = split(path).ok_or(Errno::EINVAL)?;
        let wd = inotify.add_watch(&dir, MASK)?;
        // SAFETY: the AsyncFd owns the Inotify, whose descriptor stays open and the same until
        // both are dropped together.
        let fd = unsafe { AsyncFd::register(Notify(inotify)) }
            .map_err(|e| Errno::from_raw(std::io::Error::from(e).raw_os_error().unwrap_or(0)))?;
        let mut w = Self {
            fd,
            names: HashMap::from([(wd, (dir, name))]),
            target: None,
            writing: false,
            due: false,
            overflowed: false,
        };
        w.follow_target(path);
        Ok(w)
    }

    /// When `path` is a symlink, also watches its target's directory (in-place edits of the
    /// target show there, not in the link's directory).
    fn follow_target(&mut self, path: &Path) {
        let Some((dir, name)) = std::fs::canonicalize(path).ok().and_then(|p| split(&p)) else {
            return;
        };
        let linked = self.target.as_ref().is_some_and(|(_, d)| *d == dir);
        if linked || split(path).is_some_and(|(d, _)| d == dir) {
            return;
        }
        if let Some((old, _)) = self.target.take() {
            self.names.remove(&old);
            // Gone already when the old directory was removed (a ConfigMap swap).
            let _ = self.fd.get_ref().0.rm_watch(old);
        }
        match self.fd.get_ref().0.add_watch(&dir, MASK) {
            Ok(wd) => {
                self.names.insert(wd, (dir.clone(), name));
                self.target = Some((wd, dir));
            }
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "cannot watch the config file's target directory")
            }
        }
    }

    /// Waits until a change may be complete: something happened and no writer is still
    /// writing in place.
    async fn wait(&mut self, path: &Path) {
        while !self.overflowed && (!self.due || self.writing) {
            let Ok(mut guard) = self.fd.readable_mut().await else {
                self.overflowed = true;
                return;
            };
            let events = guard.get_inner().0.read_events();
            match events {
                Ok(events) => self.absorb(path, events),
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => {
                    warn!(error = %e, "reading inotify events failed: polling the config file");
                    self.overflowed = true;
                }
            }
        }
    }

    /// Reads the file if it is whole; None when a write began meanwhile (read again after it).
    fn take_whole(&mut self, path: &Path) -> Option<String> {
        if self.overflowed {
            return None;
        }
        self.due = false;
        let text = std::fs::read_to_string(path).ok();
        // A writer that started while we read makes this text suspect.
        self.drain(path);
        if self.writing || self.overflowed {
            return None;
        }
        self.follow_target(path);
        text
    }

    /// Absorbs the events already queued (non-blocking).
    fn drain(&mut self, path: &Path) {
        loop {
            match self.fd.get_ref().0.read_events() {
                Ok(events) => self.absorb(path, events),
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    self.overflowed = true;
                    return;
                }
            }
        }
    }

    fn absorb(&mut self, path: &Path, events: Vec<nix::sys::inotify::InotifyEvent>) {
        for ev in events {
            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                warn!(file = %path.display(), "inotify queue overflowed: the next change is applied once it reads the same twice");
                self.overflowed = true;
                self.writing = false;
                continue;
            }
            let (Some((dir, mine)), Some(name)) = (self.names.get(&ev.wd), ev.name.as_ref()) else {
                continue;
            };
            let m = ev.mask;
            if name == mine {
                if m.contains(AddWatchFlags::IN_MODIFY) {
                    self.writing = true;
                }
                if m.intersects(AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO) {
                    self.writing = false;
                    self.due = true;
                }
                if m.contains(AddWatchFlags::IN_CREATE) {
                    // A new regular file is being written (its close follows); a new symlink
                    // is whole at once.
                    if is_symlink(&dir.join(name)) {
                        self.writing = false;
                        self.due = true;
                    } else {
                        self.writing = true;
                    }
                }
            } else if m.contains(AddWatchFlags::IN_MOVED_TO)
                || (m.contains(AddWatchFlags::IN_CREATE) && is_symlink(&dir.join(name)))
            {
                // Another entry swapped in (a ConfigMap's `..data`): read and compare.
                self.due = true;
            }
        }
    }
}

fn split(path: &Path) -> Option<(PathBuf, OsString)> {
    let name = path.file_name()?.to_owned();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    Some((dir, name))
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    if m.file_type().is_fifo() {
        return None;
    }
    Some((m.modified().ok()?, m.len(), m.ino()))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write as _;

    use tokio::time::timeout;

    use super::*;

    /// A fresh directory under the system's temp dir, removed afterwards.
    pub(crate) struct Dir(pub PathBuf);

    impl Dir {
        pub(crate) fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!(
                "mesh-cfgfile-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SHORT: Duration = Duration::from_millis(20);

    async fn nothing_within(f: &mut ConfigFile, ms: u64) {
        if let Ok(text) = timeout(Duration::from_millis(ms), f.next()).await {
            panic!("handed out while it should not be: {text:?}");
        }
    }

    async fn within(f: &mut ConfigFile, ms: u64) -> String {
        timeout(Duration::from_millis(ms), f.next())
            .await
            .expect("the change was not handed out")
    }

    #[tokio::test]
    async fn in_place_write_is_read_only_after_the_writer_closes() {
        let d = Dir::new("inplace");
        let path = d.0.join("config.yaml");
        std::fs::write(&path, "old: 1\n").unwrap();
        let mut f = ConfigFile::new(&path, SHORT, Duration::from_millis(100));
        assert!(f.watching());
        assert_eq!(f.read_initial().unwrap(), "old: 1\n");
        let mut w = std::fs::File::create(&path).unwrap();
        w.write_all(b"new: ").unwrap();
        // Longer than any settle interval: stability alone would hand out "new: ".
        nothing_within(&mut f, 400).await;
        w.write_all(b"2\n").unwrap();
        nothing_within(&mut f, 200).await;
        drop(w);
        assert_eq!(within(&mut f, 2000).await, "new: 2\n");
        // The same text is not handed out again.
        nothing_within(&mut f, 200).await;
    }

    #[tokio::test]
    async fn a_file_renamed_into_place_is_read_at_once() {
        let d = Dir::new("rename");
        let path = d.0.join("config.yaml");
        std::fs::write(&path, "old: 1\n").unwrap();
        let mut f = ConfigFile::new(&path, Duration::from_secs(3600), Duration::from_secs(3600));
        f.read_initial().unwrap();
        // Noise in the directory is not a change.
        std::fs::write(d.0.join("other.yaml"), "x: 1\n").unwrap();
        nothing_within(&mut f, 200).await;
        let tmp = d.0.join(".config.yaml.tmp");
        std::fs::write(&tmp, "new: 2\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(within(&mut f, 1000).await, "new: 2\n");
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn a_configmap_style_symlink_swap_is_read_at_once() {
        use std::os::unix::fs::symlink;
        let d = Dir::new("configmap");
        std::fs::create_dir(d.0.join("..v1")).unwrap();
        std::fs::write(d.0.join("..v1/config.yaml"), "v: 1\n").unwrap();
        symlink("..v1", d.0.join("..data")).unwrap();
        symlink("..data/config.yaml", d.0.join("config.yaml")).unwrap();
        let path = d.0.join("config.yaml");
        let mut f = ConfigFile::new(&path, Duration::from_secs(3600), Duration::from_secs(3600));
        assert_eq!(f.read_initial().unwrap(), "v: 1\n");
        // The kubelet's swap: a new directory, a new `..data` link renamed over the old one.
        std::fs::create_dir(d.0.join("..v2")).unwrap();
        std::fs::write(d.0.join("..v2/config.yaml"), "v: 2\n").unwrap();
        symlink("..v2", d.0.join("..data_tmp")).unwrap();
        std::fs::rename(d.0.join("..data_tmp"), d.0.join("..data")).unwrap();
        assert_eq!(within(&mut f, 1000).await, "v: 2\n");
        // An in-place edit of the new target (its directory is watched now) waits for the close.
        let mut w = std::fs::File::create(d.0.join("..v2/config.yaml")).unwrap();
        w.write_all(b"v: ").unwrap();
        nothing_within(&mut f, 300).await;
        w.write_all(b"3\n").unwrap();
        drop(w);
        assert_eq!(within(&mut f, 1000).await, "v: 3\n");
    }

    #[tokio::test]
    async fn polling_hands_out_only_a_file_that_stopped_changing() {
        let d = Dir::new("poll");
        let path = d.0.join("config.yaml");
        std::fs::write(&path, "old: 1\n").unwrap();
        let mut f = ConfigFile::polling(&path, SHORT, Duration::from_millis(250));
        assert!(!f.watching());
        f.read_initial().unwrap();
        // A writer appending every 60 ms (shorter than the settle interval).
        let p = path.clone();
        let writer = std::thread::spawn(move || {
            let mut w = std::fs::File::create(&p).unwrap();
            for i in 0..8 {
                writeln!(w, "k{i}: {i}").unwrap();
                std::thread::sleep(Duration::from_millis(60));
            }
        });
        nothing_within(&mut f, 400).await;
        writer.join().unwrap();
        let text = within(&mut f, 2000).await;
        assert_eq!(text.lines().count(), 8, "{text}");
    }
}
