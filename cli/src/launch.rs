//! Child processes of `switchyard up` and `switchyard bench`: each role runs as
//! `switchyard <role> ...`, prints `ready: <what> <address> ...` on stdout once it serves, and has
//! its output forwarded line by line with a `[name]` prefix (and kept in a log file per child
//! with `--data-dir`). Children die with their parent
//! (PR_SET_PDEATHSIG on Linux) and are stopped with SIGTERM, then SIGKILL after a grace period.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// How long a child gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

pub struct Proc {
    pub name: String,
    child: Child,
    ready: mpsc::UnboundedReceiver<String>,
    /// The last error the child printed (its `error: ...` line, else its last `ERROR` log line).
    cause: Arc<Mutex<Option<String>>>,
    /// Copies the child's stderr; ends when the child's stderr closes.
    stderr: Option<tokio::task::JoinHandle<()>>,
}

impl Proc {
    /// Starts `switchyard <args>` as child `name`, its output going where `out` says.
    pub fn spawn(name: &str, args: &[String], out: &Output) -> Result<Self> {
        Self::spawn_with_env(name, args, &[], out)
    }

    /// [`Proc::spawn`] with environment variables added (for secrets, which the command line
    /// would show to every local user).
    pub fn spawn_with_env(name: &str, args: &[String], env: &[(&str, &str)], out: &Output) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the switchyard binary")?;
        let mut cmd = Command::new(exe);
        cmd.envs(env.iter().copied());
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        let (tx, ready) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let prefix = format!("[{name}]");
        let log = match &out.log_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
                let path = dir.join(format!("{name}.log"));
                let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
                Some(Arc::new(Mutex::new(file.with_context(|| format!("cannot open {}", path.display()))?)))
            }
            None => None,
        };
        let cause = Arc::new(Mutex::new(None));
        let sink = Sink { prefix, quiet: out.quiet, log, cause: None };
        tokio::spawn(forward(BufReader::new(stdout), sink.clone(), Some(tx)));
        let stderr = tokio::spawn(forward(BufReader::new(stderr), Sink { cause: Some(cause.clone()), ..sink }, None));
        Ok(Proc { name: name.to_string(), child, ready, cause, stderr: Some(stderr) })
    }

    /// Waits for the child's `ready: ...` line and returns what follows `ready: `
    /// (`WHAT ADDRESS [WHAT ADDRESS ...]`).
    pub async fn ready(&mut self, timeout: Duration) -> Result<String> {
        tokio::select! {
            line = self.ready.recv() => match line {
                Some(line) => Ok(line),
                // Its stdout closed: it is exiting (or has closed stdout, which it never does).
                None => match tokio::time::timeout(GRACE, self.child.wait()).await {
                    Ok(status) => {
                        let status = status?;
                        bail!("{}", self.exited(status, " before it was ready").await)
                    }
                    Err(_) => bail!("{} closed its output before it was ready", self.name),
                },
            },
            status = self.child.wait() => {
                let status = status?;
                bail!("{}", self.exited(status, " before it was ready").await)
            }
            _ = tokio::time::sleep(timeout) => bail!("{} was not ready within {}s", self.name, timeout.as_secs()),
        }
    }

    /// Waits for the child's `ready: ...` line like [`Proc::ready`], and fails as soon as one of
    /// `others` (started before it) exits, with that child's own error.
    pub async fn ready_while(&mut self, others: &mut [Proc], timeout: Duration) -> Result<String> {
        let ready = self.ready(timeout);
        tokio::pin!(ready);
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                answer = &mut ready => return answer,
                _ = poll.tick() => {
                    for other in others.iter_mut() {
                        if let Some(status) = other.try_wait()? {
                            bail!("{}", other.exited(status, "").await);
                        }
                    }
                }
            }
        }
    }

    /// The exit status if the child has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// `NAME exited WHEN (STATUS): CAUSE`, with the child's own last error once its stderr is
    /// read to the end.
    pub async fn exited(&mut self, status: std::process::ExitStatus, when: &str) -> String {
        if let Some(stderr) = self.stderr.take() {
            // A grandchild holding the pipe open must not hold this up.
            let _ = tokio::time::timeout(Duration::from_secs(2), stderr).await;
        }
        match self.cause.lock().expect("cause lock").as_deref() {
            Some(cause) => format!("{} exited{when} ({status}): {}", self.name, cause.trim_start_matches("error: ")),
            None => format!("{} exited{when} ({status})", self.name),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within the grace period.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            if tokio::time::timeout(GRACE, self.child.wait()).await.is_ok() {
                return;
            }
            tracing::warn!("{} did not stop within {}s; killing it", self.name, GRACE.as_secs());
        }
        let _ = self.child.kill().await;
    }
}

/// Where children's output goes: our stderr with a `[name]` prefix (unless `quiet`), and
/// `log_dir/NAME.log` when set.
#[derive(Clone, Default)]
pub struct Output {
    pub quiet: bool,
    pub log_dir: Option<PathBuf>,
}

#[derive(Clone)]
struct Sink {
    prefix: String,
    quiet: bool,
    log: Option<Arc<Mutex<std::fs::File>>>,
    /// Where the last error line goes (stderr only).
    cause: Option<Arc<Mutex<Option<String>>>>,
}

impl Sink {
    /// Keeps `line` as the cause if it is the process's final `error: ...` line, or an `ERROR`
    /// log line while no final line has come.
    fn note_error(&self, line: &str) {
        let Some(cause) = &self.cause else { return };
        let mut cause = cause.lock().expect("cause lock");
        if line.starts_with("error: ") {
            *cause = Some(line.to_string());
        } else if line.contains(" ERROR ") && !cause.as_deref().is_some_and(|c| c.starts_with("error: ")) {
            *cause = Some(line.split_once(" ERROR ").map_or(line, |(_, rest)| rest).trim().to_string());
        }
    }
}

/// Copies `reader`'s lines to `sink`; a `ready:` line goes to `ready` instead.
async fn forward<R: tokio::io::AsyncRead + Unpin>(
    reader: BufReader<R>,
    sink: Sink,
    ready: Option<mpsc::UnboundedSender<String>>,
) {
    let mut reader = reader;
    let mut buf = Vec::new();
    // Lines that are not UTF-8 are shown lossily; stopping would leave the pipe undrained.
    while reader.read_until(b'\n', &mut buf).await.is_ok_and(|n| n > 0) {
        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
        buf.clear();
        if let (Some(tx), Some(rest)) = (&ready, line.strip_prefix("ready: ")) {
            let _ = tx.send(rest.to_string());
            continue;
        }
        sink.note_error(&line);
        if let Some(log) = &sink.log {
            let _ = writeln!(log.lock().expect("log lock"), "{line}");
        }
        if !sink.quiet {
            eprintln!("{} {line}", sink.prefix);
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A multi-threaded runtime for a role's network side (its compute has its own threads).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}
