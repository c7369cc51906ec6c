//! Ctrl-C handling: SIGINT and SIGTERM set a flag instead of killing the process, so
//! whoever drives a testbed (the demo, a benchmark) can stop and tear it down.
//!
//! Every bounded wait in this crate checks [`interrupted`] and gives up early with an
//! error, which unwinds to the [`Testbed`](crate::Testbed)'s `Drop`.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs handlers for SIGINT and SIGTERM that only record the signal (see
/// [`interrupted`]). Children started by the testbed run in their own process groups,
/// so a terminal's Ctrl-C reaches only this process.
pub fn install_interrupt_handler() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let prev = unsafe { libc::signal(sig, handler) };
        if prev == libc::SIG_ERR {
            anyhow::bail!(
                "cannot install a handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived since [`install_interrupt_handler`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
