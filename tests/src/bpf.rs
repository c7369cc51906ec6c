//! What BPF programs are attached to a device by TCX (Linux 6.6+) or, on older
//! kernels, as netlink `cls_bpf` filters, and whether a program is still loaded.
//!
//! `bpftool net show` before v7.3 does not list TCX attachments; aya's
//! [`SchedClassifier::query_tcx`] asks the kernel directly (`BPF_PROG_QUERY`). It
//! resolves the device name in the calling thread's network namespace, so the query
//! runs on a thread inside the device's namespace. Netlink filters (kernels without
//! TCX, where the agent attaches that way) are listed by `bpftool net show`.

use std::ffi::CString;

use anyhow::{Context, Result};
use aya::{
    programs::{ProgramError, SchedClassifier, TcAttachType, loaded_programs},
    util::KernelVersion,
};

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

/// Whether this kernel has TCX (6.6+): the agent then attaches through TCX links,
/// otherwise as netlink filters under a `clsact` qdisc (the agent's own rule).
pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Lists the TC programs attached to `dev` in namespace `ns` the way the agent
/// attaches on this kernel: TCX ([`tcx_programs`]) when [`tcx_supported`], else the
/// netlink `cls_bpf` filters of its `clsact` qdisc (`bpftool net show`).
pub fn attached_programs(ns: &str, dev: &str) -> Result<Vec<TcxProg>> {
    if tcx_supported() {
        return tcx_programs(ns, dev);
    }
    let out = crate::traffic::ns_exec(ns, &["bpftool", "--json", "net", "show", "dev", dev])
        .with_context(|| format!("listing the TC filters of {dev} in {ns}"))?;
    parse_bpftool_net(&out).with_context(|| format!("bpftool net show of {dev} in {ns}: {out}"))
}

/// The `tc` entries of `bpftool --json net show`: `[{"tc": [{"kind": "clsact/ingress",
/// "name": "weft_decap", "id": 42, ...}], ...}]`.
fn parse_bpftool_net(json: &str) -> Result<Vec<TcxProg>> {
    let value: serde_json::Value = serde_json::from_str(json).context("not JSON")?;
    let mut out = Vec::new();
    for entry in value.as_array().into_iter().flatten() {
        for tc in entry["tc"].as_array().into_iter().flatten() {
            let direction = match tc["kind"].as_str() {
                Some(kind) if kind.ends_with("ingress") => "ingress",
                Some(kind) if kind.ends_with("egress") => "egress",
                _ => continue,
            };
            out.push(TcxProg {
                direction,
                id: tc["id"]
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .context("a tc entry without an id")?,
                name: tc["name"].as_str().unwrap_or_default().to_owned(),
            });
        }
    }
    Ok(out)
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
    fn parses_bpftool_net_show() {
        let json = r#"[{"xdp":[],"tc":[{"devname":"weft-vxlan","ifindex":5,"kind":"clsact/ingress","name":"weft_decap","id":42},{"devname":"weft-vxlan","ifindex":5,"kind":"clsact/egress","name":"weft_encap","id":41}],"flow_dissector":[]}]"#;
        let progs = parse_bpftool_net(json).unwrap();
        assert_eq!(
            progs,
            [
                TcxProg {
                    direction: "ingress",
                    id: 42,
                    name: "weft_decap".into()
                },
                TcxProg {
                    direction: "egress",
                    id: 41,
                    name: "weft_encap".into()
                },
            ]
        );
        assert!(parse_bpftool_net("[{}]").unwrap().is_empty());
    }

    #[test]
    fn id_zero_is_never_a_program() {
        match prog_exists(0) {
            Ok(exists) => assert!(!exists),
            Err(e) => assert!(!crate::is_root(), "as root: {e:#}"),
        }
    }
}
