//! A [`Place`] is somewhere a testbed runs things: the fabric, a node or a pod. Each has its own
//! network namespace and cgroup v2 directory; processes started there join both.
use std::{
    ffi::OsStr,
    fs,
    io::{ErrorKind, Read},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::netns;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Place {
    /// Short name within the run: `fabric`, `node1`, `node1-pod2`.
    pub name: String,
    /// Name of its netns under /run/netns.
    pub netns: String,
    /// Its cgroup v2 directory.
    pub cgroup: PathBuf,
}

impl Place {
    /// A command that will run inside this place: its netns, its cgroup. The parent's mount
    /// namespace is kept (unlike `ip netns exec`, which remounts /sys and hides cgroup v2).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let ns = fs::File::open(netns::path(&self.netns))
            .with_context(|| format!("opening netns of {}", self.name))?;
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .with_context(|| format!("opening cgroup of {}", self.name))?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // syscalls (write, setns) on fds opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process (the child) into the cgroup.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `program args` here to completion; returns stdout, or an error with stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.output(program, args)?;
        if !out.status.success() {
            bail!(
                "`{program} {}` in {} failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `program args` here to completion and returns whatever it produced.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.command(program)?
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("starting `{program}` in {}", self.name))
    }

    /// Starts a long-running `program args` here. Its output is collected (the last
    /// [`OUTPUT_TAIL`] bytes of each stream) and returned when it ends; it is killed when the
    /// handle drops (and with every process of the run at teardown).
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<Background> {
        let mut child = self
            .command(program)?
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{program}` in {}", self.name))?;
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Ok(Background {
            child: Some(child),
            what: format!("`{program} {}` in {}", args.join(" "), self.name),
            stdout,
            stderr,
        })
    }

    /// Runs a Rust closure with this place's network namespace (not its cgroup: cgroup membership
    /// is per process, so code that must be in the cgroup runs as a process via [`Place::spawn`]).
    pub fn in_netns<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        netns::run_in(&self.netns, f)
    }

    /// How a person enters this place from a root shell.
    pub fn enter_hint(&self) -> String {
        format!(
            "nsenter --net={} sh -c 'echo $$ > {}/cgroup.procs; exec bash'",
            netns::path(&self.netns).display(),
            self.cgroup.display()
        )
    }
}

/// How much of each output stream a [`Background`] process keeps (its tail).
pub const OUTPUT_TAIL: usize = 4 << 20;

/// Reads a stream to its end on a thread, so a chatty process never blocks on a full pipe, keeping
/// the last [`OUTPUT_TAIL`] bytes.
fn drain(mut stream: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > OUTPUT_TAIL {
                kept.drain(..kept.len() - OUTPUT_TAIL);
            }
        }
        kept
    })
}

/// A process started by [`Place::spawn`].
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
    what: String,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Background {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits until the process listens on TCP `port` (IPv4 or IPv6) in its namespace, by reading
    /// its /proc/<pid>/net tables, so no probe connection disturbs the server.
    pub fn wait_listening(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.listening_on(port)? {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!("{} exited ({status}) before listening on {port}", self.what);
            }
            if Instant::now() > deadline {
                bail!("{} is not listening on {port} after {timeout:?}", self.what);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn listening_on(&self, port: u16) -> Result<bool> {
        const TCP_LISTEN: &str = "0A";
        let want = format!("{port:04X}");
        for table in ["tcp", "tcp6"] {
            let path = format!("/proc/{}/net/{table}", self.pid());
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e).with_context(|| format!("reading {path}")),
            };
            let listening = text.lines().skip(1).any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.len() > 3
                    && cols[3] == TCP_LISTEN
                    && cols[1].rsplit(':').next() == Some(want.as_str())
            });
            if listening {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("{} was already collected", self.what),
        }
    }

    /// Waits for the process to exit by itself and returns its output.
    pub fn wait(mut self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        while self.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("{} still running after {timeout:?}", self.what);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.collect()
    }

    /// Asks the process to stop (SIGTERM) and waits for it to exit.
    pub fn terminate(self, timeout: Duration) -> Result<Output> {
        self.sigterm()?;
        self.wait(timeout)
    }

    /// Sends SIGTERM and returns at once: for a drain the caller watches.
    pub fn sigterm(&self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("signalling {}", self.what))
    }

    /// Kills the process and returns its output so far.
    pub fn kill(mut self) -> Result<Output> {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        self.collect()
    }

    /// Reaps the (exited or killed) process and joins the output readers. They end once every
    /// holder of the pipes has exited; a grandchild that keeps them open (killed at teardown with
    /// the cgroup) must not hang us, so each reader gets a bounded wait.
    fn collect(&mut self) -> Result<Output> {
        let mut child = self.child.take().expect("present until collected");
        let status = child.wait()?;
        let join = |h: Option<JoinHandle<Vec<u8>>>| {
            let h = h?;
            let deadline = Instant::now() + Duration::from_secs(2);
            while !h.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            h.is_finished().then(|| h.join().unwrap_or_default())
        };
        Ok(Output {
            status,
            stdout: join(self.stdout.take()).unwrap_or_default(),
            stderr: join(self.stderr.take()).unwrap_or_default(),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
