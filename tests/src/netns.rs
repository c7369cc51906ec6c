//! Running Rust code inside a network namespace: the namespace is per thread on
//! Linux, so a fresh thread enters it with `setns` and sockets it creates stay there.

use std::{fs::File, os::fd::AsRawFd, thread::JoinHandle};

use anyhow::{Context, Result, bail};

/// Spawns a thread that enters network namespace `ns` (`/run/netns/<ns>`) and runs
/// `f` there. Join the handle for `f`'s result.
pub fn spawn_in<T, F>(ns: &str, f: F) -> JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter(&path)?;
        f()
    })
}

/// Moves the calling thread into the network namespace bound at `path`.
fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open namespace {path}"))?;
    // SAFETY: setns only reads the fd, which `file` keeps open for the call; it changes
    // the namespace of the calling thread alone (std threads share no namespace state).
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        bail!("setns({path}) failed: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The cookie of network namespace `ns` (`SO_NETNS_COOKIE`), which names an agent's
/// pin directory (`<bpffs>/weft/netns-<cookie>`).
pub fn cookie(ns: &str) -> Result<u64> {
    join(
        spawn_in(ns, || {
            weft_common::netns::cookie().context("SO_NETNS_COOKIE")
        }),
        "netns cookie",
    )
}

/// Joins a thread from [`spawn_in`], turning a panic into an error.
pub fn join<T>(h: JoinHandle<Result<T>>, what: &str) -> Result<T> {
    match h.join() {
        Ok(r) => r,
        Err(_) => bail!("{what}: thread panicked"),
    }
}
