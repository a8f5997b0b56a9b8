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

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// How long a child gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

pub struct Proc {
    pub name: String,
    child: Child,
    ready: mpsc::UnboundedReceiver<String>,
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
        let sink = Sink { prefix, quiet: out.quiet, log };
        tokio::spawn(forward(BufReader::new(stdout), sink.clone(), Some(tx)));
        tokio::spawn(forward(BufReader::new(stderr), sink, None));
        Ok(Proc { name: name.to_string(), child, ready })
    }

    /// Waits for the child's `ready: ...` line and returns what follows `ready: `
    /// (`WHAT ADDRESS [WHAT ADDRESS ...]`).
    pub async fn ready(&mut self, timeout: Duration) -> Result<String> {
        tokio::select! {
            line = self.ready.recv() => line.ok_or_else(|| anyhow!("{} closed its output before it was ready", self.name)),
            status = self.child.wait() => bail!("{} exited before it was ready ({})", self.name, status?),
            _ = tokio::time::sleep(timeout) => bail!("{} was not ready within {}s", self.name, timeout.as_secs()),
        }
    }

    /// The exit status if the child has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
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
