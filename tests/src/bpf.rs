//! What BPF programs are attached to a device by TCX (Linux 6.6+), and whether a
//! program is still loaded, through aya's own queries.
//!
//! `bpftool net show` before v7.3 does not list TCX attachments; aya's
//! [`SchedClassifier::query_tcx`] asks the kernel directly (`BPF_PROG_QUERY`). It
//! resolves the device name in the calling thread's network namespace, so the query
//! runs on a thread inside the device's namespace.

use std::ffi::CString;

use anyhow::{Context, Result};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, loaded_programs};

/// A program attached by TCX.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcxProg {
    /// `"ingress"` or `"egress"`.
    pub direction: &'static str,
    /// Kernel program id.
    pub id: u32,
    /// Program name as the kernel keeps it (at most 15 bytes).
    pub name: String,
}

/// Lists the programs attached by TCX to `dev` in namespace `ns`, both directions.
pub fn tcx_programs(ns: &str, dev: &str) -> Result<Vec<TcxProg>> {
    let name = CString::new(dev).context("device name")?;
    crate::netns::join(
        crate::netns::spawn_in(ns, move || {
            let mut out = Vec::new();
            for (direction, hook) in [
                ("ingress", TcAttachType::Ingress),
                ("egress", TcAttachType::Egress),
            ] {
                let (_revision, infos) = SchedClassifier::query_tcx(name.as_c_str(), hook)
                    .with_context(|| format!("TCX {direction} query"))?;
                out.extend(infos.into_iter().map(|info| TcxProg {
                    direction,
                    id: info.id(),
                    name: info.name_as_str().unwrap_or_default().to_owned(),
                }));
            }
            Ok(out)
        }),
        "tcx query",
    )
    .with_context(|| format!("querying TCX programs of {dev} in {ns}"))
}

/// Whether a BPF program with `id` is still loaded.
pub fn prog_exists(id: u32) -> Result<bool> {
    for info in loaded_programs() {
        match info {
            Ok(info) if info.id() == id => return Ok(true),
            Ok(_) => {}
            // A program freed between being listed and being opened.
            Err(ProgramError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("listing the loaded BPF programs"),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs no privilege: listing programs as non-root fails, which must not read
    /// as "not loaded".
    #[test]
    fn id_zero_is_never_a_program() {
        match prog_exists(0) {
            Ok(exists) => assert!(!exists),
            Err(e) => assert!(!crate::is_root(), "as root: {e:#}"),
        }
    }
}
