//! What BPF programs are attached to a device by TCX (Linux 6.6+).
//!
//! `bpftool net show` before v7.3 does not list TCX attachments, so this asks the
//! kernel directly (`BPF_PROG_QUERY` with `BPF_TCX_INGRESS` / `BPF_TCX_EGRESS`) from a
//! thread inside the device's namespace, and names the programs with `bpftool`.

use std::ffi::CString;

use anyhow::{Context, Result, bail};

use crate::cmd::run_args;

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const MAX_PROGS: usize = 64;

/// The `query` member of `union bpf_attr` (64 bytes, 8-aligned).
#[repr(C, align(8))]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// A program attached by TCX.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcxProg {
    /// `"ingress"` or `"egress"`.
    pub direction: &'static str,
    /// Kernel program id.
    pub id: u32,
    /// Program name (as `bpftool prog show` gives it; empty if it has vanished).
    pub name: String,
}

/// Lists the programs attached by TCX to `dev` in namespace `ns`, both directions.
pub fn tcx_programs(ns: &str, dev: &str) -> Result<Vec<TcxProg>> {
    let dev_s = dev.to_string();
    let ids = crate::netns::join(
        crate::netns::spawn_in(ns, move || query_all(&dev_s)),
        "tcx query",
    )
    .with_context(|| format!("querying TCX programs of {dev} in {ns}"))?;
    Ok(ids
        .into_iter()
        .map(|(direction, id)| TcxProg {
            direction,
            id,
            name: prog_name(id).unwrap_or_default(),
        })
        .collect())
}

/// Whether a BPF program with `id` is still loaded.
pub fn prog_exists(id: u32) -> bool {
    prog_name(id).is_ok()
}

fn prog_name(id: u32) -> Result<String> {
    let out = run_args("bpftool", &["-j", "prog", "show", "id", &id.to_string()])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("bpftool JSON")?;
    Ok(v["name"].as_str().unwrap_or_default().to_string())
}

fn query_all(dev: &str) -> Result<Vec<(&'static str, u32)>> {
    let name = CString::new(dev).context("device name")?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no device {dev}: {}", std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    for (direction, attach_type) in [("ingress", BPF_TCX_INGRESS), ("egress", BPF_TCX_EGRESS)] {
        let mut ids = [0u32; MAX_PROGS];
        let mut attr = QueryAttr {
            target_ifindex: ifindex,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: MAX_PROGS as u32,
            ..QueryAttr::default()
        };
        // SAFETY: `attr` is a properly laid out, 8-aligned `bpf_attr` prefix of the size
        // passed; the kernel writes at most `prog_cnt` ids into `ids`, which outlives
        // the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut QueryAttr,
                size_of::<QueryAttr>() as libc::c_uint,
            )
        };
        if r != 0 {
            bail!(
                "BPF_PROG_QUERY ({direction}) on {dev}: {}",
                std::io::Error::last_os_error()
            );
        }
        let n = (attr.prog_cnt as usize).min(MAX_PROGS);
        out.extend(ids[..n].iter().map(|&id| (direction, id)));
    }
    Ok(out)
}
