//! The one place where the testbed runs external programs (`ip`, `bridge`, `ping`,
//! `tcpdump`, `iperf3`, the agent...).
//!
//! Every command runs in its own process group (so a terminal's Ctrl-C reaches only
//! the testbed, which then tears down in order), with a bounded wait, and every
//! failure names the full command line, how it ended and its stderr.

use std::{
    fmt::Write as _,
    io::Read,
    os::unix::process::{CommandExt, ExitStatusExt},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::signal::interrupted;

/// How long a plain configuration command (`ip`, `bridge`, `sysctl`) may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often bounded waits poll.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Renders `cmd` as a shell-like command line, for error messages.
pub fn command_line(cmd: &Command) -> String {
    let mut s = quote(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(&a.to_string_lossy()));
    }
    s
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Describes how a process ended (`exit status 1`, `killed by signal 9`).
pub fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{status}"),
    }
}

/// Prepares a command to run in network namespace `ns` only (`nsenter --net`): unlike
/// `ip netns exec` it keeps the host's mounts, bpffs included, as a DaemonSet pod
/// with `hostNetwork` and a hostPath `/sys/fs/bpf` sees them. Agents run this way,
/// so their pinned datapath survives them.
pub fn host_command<S: AsRef<std::ffi::OsStr>>(ns: &str, program: S) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    c
}

/// Prepares a command to run inside network namespace `ns` (`ip netns exec ns ...`).
pub fn ns_command<S: AsRef<std::ffi::OsStr>>(ns: &str, program: S) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// Runs `cmd` to completion within `timeout` and returns what it printed, whatever its
/// exit status. Fails if it cannot start, outlives `timeout` (it is then killed) or
/// the process is interrupted ([`crate::interrupted`]).
pub fn output(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    output_inner(cmd, timeout, true)
}

/// As [`output`], but not cut short by an interrupt: for teardown, which must finish.
pub fn output_uninterruptible(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    output_inner(cmd, timeout, false)
}

fn output_inner(cmd: &mut Command, timeout: Duration, interruptible: bool) -> Result<Output> {
    let line = command_line(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let waited = if interruptible {
        wait_bounded(&mut child, timeout)
    } else {
        wait_uninterruptible(&mut child, timeout)
    };
    let status = match waited {
        Ok(Some(status)) => status,
        Ok(None) => {
            kill_group(&mut child);
            let stderr = err.join().unwrap_or_default();
            bail!(
                "`{line}` did not finish within {timeout:?} (killed); stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        Err(e) => {
            kill_group(&mut child);
            return Err(e.context(format!("while running `{line}`")));
        }
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Runs `cmd` within `timeout` and returns its stdout; fails unless it exits with
/// status 0, with an error naming the command line, exit status and stderr.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let line = command_line(cmd);
    let out = output(cmd, timeout)?;
    check(&line, out)
}

/// As [`run`], but not cut short by an interrupt: for teardown, which must finish.
pub fn run_uninterruptible(cmd: &mut Command) -> Result<String> {
    let line = command_line(cmd);
    let out = output_uninterruptible(cmd, DEFAULT_TIMEOUT)?;
    check(&line, out)
}

fn check(line: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        let mut msg = format!("`{line}` failed: {}", describe_status(&out.status));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let _ = write!(msg, "; stderr: {}", stderr.trim());
        if !stdout.trim().is_empty() {
            let _ = write!(msg, "; stdout: {}", tail(&stdout, 2000));
        }
        bail!(msg);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run_timeout`] with [`DEFAULT_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Result<String> {
    run_timeout(cmd, DEFAULT_TIMEOUT)
}

/// Runs `program args...` (a convenience over [`run`]).
pub fn run_args(program: &str, args: &[&str]) -> Result<String> {
    run(Command::new(program).args(args))
}

/// Runs `program args...` inside namespace `ns` (a convenience over [`run`]).
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    run(ns_command(ns, program).args(args))
}

/// Waits up to `timeout` for `child` to exit. `Ok(None)` on timeout; an error if a
/// signal interrupted the run first.
pub(crate) fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    wait_for(child, timeout, true)
}

/// Waits up to `timeout` for `child` to exit, ignoring interrupts (for teardown).
/// `Ok(None)` on timeout.
pub(crate) fn wait_uninterruptible(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<ExitStatus>> {
    wait_for(child, timeout, false)
}

fn wait_for(
    child: &mut Child,
    timeout: Duration,
    interruptible: bool,
) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waitpid failed")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        if interruptible && interrupted() {
            bail!("interrupted by a signal");
        }
        thread::sleep(POLL);
    }
}

/// Kills `child`'s whole process group with SIGKILL and reaps it.
pub(crate) fn kill_group(child: &mut Child) {
    signal_group(child.id(), libc::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `sig` to the process group led by `pid` (children made here lead their own).
pub(crate) fn signal_group(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only makes it
        // fail with ESRCH.
        unsafe { libc::kill(-pid, sig) };
    }
}

/// Sends `sig` to the single process `pid`.
pub(crate) fn signal_pid(pid: u32, sig: libc::c_int) -> Result<()> {
    let p = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(p, sig) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("kill({pid}, {sig}) failed: {e}");
    }
    Ok(())
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// The last `max` bytes of `s` (on a char boundary), for error messages.
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_quotes_only_what_needs_it() {
        let mut c = Command::new("ip");
        c.args(["link", "add", "a b", "it's", ""]);
        assert_eq!(command_line(&c), r"ip link add 'a b' 'it'\''s' ''");
    }

    #[test]
    fn failure_names_command_status_and_stderr() {
        let e = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("sh -c 'echo oops >&2; exit 3'"), "{msg}");
        assert!(msg.contains("exit status 3"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn timeout_kills_and_says_so() {
        let e =
            run_timeout(Command::new("sleep").arg("5"), Duration::from_millis(200)).unwrap_err();
        assert!(format!("{e:#}").contains("did not finish within"), "{e:#}");
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("ab", 5), "ab");
    }
}
