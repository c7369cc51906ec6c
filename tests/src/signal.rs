//! Ctrl-C handling: SIGINT and SIGTERM set a flag instead of killing the process, so
//! whoever drives a testbed (the demo, a benchmark) can stop and tear it down.
//!
//! Every bounded wait in this crate checks [`interrupted`] and gives up early with an
//! error, which unwinds to the [`Testbed`](crate::Testbed)'s `Drop`. The testbed is
//! synchronous (no async runtime to run tokio's signal streams), so signal-hook's
//! flag registration does the async-signal-safe part.

use std::sync::{
    Arc, LazyLock,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};

static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// Installs handlers for SIGINT and SIGTERM that only record the signal (see
/// [`interrupted`]); the default action (terminating) no longer happens. Children
/// started by the testbed run in their own process groups, so a terminal's Ctrl-C
/// reaches only this process.
pub fn install_interrupt_handler() -> anyhow::Result<()> {
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&INTERRUPTED))
            .with_context(|| format!("cannot install a handler for signal {sig}"))?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived since [`install_interrupt_handler`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
