//! Loads the embedded eBPF object and attaches its TC programs.
//!
//! On kernels with TCX (6.6+) programs attach through BPF links owned by this
//! process: they detach when the agent exits, however it exits (even `kill -9`), so
//! there is nothing to reconcile. Older kernels use netlink `cls_bpf` filters under a
//! `clsact` qdisc, which outlive the process: before attaching, leftovers of a
//! previous run (filters named like weft's programs) are removed, and a `clsact`
//! qdisc weft added is reported back so the caller can remove it on exit.

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapError, ProgramArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        tc::{self, TcError},
    },
    util::KernelVersion,
};
use weft_common::maps::{JUMP_MAP, programs};

/// The eBPF object built by `cargo xtask build`, embedded at compile time.
#[cfg(not(weft_no_ebpf))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("WEFT_EBPF_OBJECT"));
/// None: this build found no eBPF object (see the build script).
#[cfg(weft_no_ebpf)]
static EBPF_OBJECT: &[u8] = &[];

/// Why loading or attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The binary embeds no eBPF object (built by plain cargo on a fresh clone).
    #[error("this binary was built without its eBPF programs: build with `cargo xtask build`")]
    NotEmbedded,
    /// The kernel refused for lack of privilege.
    #[error(
        "permission denied loading eBPF programs: run weft as root \
         (or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    )]
    Permission,
    /// The object could not be loaded.
    #[error("loading the eBPF object failed")]
    Load(#[source] aya::EbpfError),
    /// A program or map is missing from the object or has another type.
    #[error("eBPF object: {0} missing or of another type")]
    Program(&'static str),
    /// The verifier or the kernel rejected a program.
    #[error("loading eBPF program {name} failed")]
    ProgramLoad {
        /// The program.
        name: &'static str,
        /// What the kernel said (with the verifier log).
        #[source]
        source: ProgramError,
    },
    /// Attaching a program failed.
    #[error("attaching eBPF program {name} to interface {iface} failed")]
    Attach {
        /// The program.
        name: &'static str,
        /// The interface's ifindex.
        iface: u32,
        /// What the kernel said.
        #[source]
        source: ProgramError,
    },
    /// Filling the encapsulation program's jump table failed.
    #[error("setting up the flood jump table failed")]
    JumpTable(#[source] MapError),
    /// Preparing the legacy TC attachment failed.
    #[error("preparing TC on interface {iface} failed")]
    Tc {
        /// The interface's ifindex.
        iface: u32,
        /// What the kernel said.
        #[source]
        source: TcError,
    },
}

/// The first OS error code in a chain of errors.
fn os_error(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(code) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(code);
        }
        cur = e.source();
    }
    None
}

/// Whether a chain of errors bottoms out in EPERM/EACCES.
fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    matches!(os_error(err), Some(libc::EPERM) | Some(libc::EACCES))
}

/// Loads the embedded object (maps are created, programs not yet loaded).
pub fn load() -> Result<Ebpf, LoaderError> {
    if EBPF_OBJECT.is_empty() {
        return Err(LoaderError::NotEmbedded);
    }
    EbpfLoader::new().load(EBPF_OBJECT).map_err(|e| {
        if is_permission_error(&e) {
            LoaderError::Permission
        } else {
            LoaderError::Load(e)
        }
    })
}

/// Whether TC programs attach through TCX links (else netlink filters).
pub fn uses_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// What attaching did that the caller must undo on exit (beyond dropping the
/// `Ebpf`, which detaches the programs).
#[derive(Debug, Default)]
pub struct Attached {
    /// Interfaces (ifindexes) on which weft added a `clsact` qdisc (netlink mode).
    pub clsact_added: Vec<u32>,
}

/// The TC program `name` of `ebpf`.
fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoaderError> {
    ebpf.program_mut(name)
        .ok_or(LoaderError::Program(name))?
        .try_into()
        .map_err(|_| LoaderError::Program(name))
}

/// Loads both programs and attaches them (ifindexes): encapsulation on egress of
/// the bridge's datapath port (`vethwe-bridge`), so frames leave for the underlay
/// before crossing the veth pair; decapsulation on ingress of the underlay.
pub fn attach(ebpf: &mut Ebpf, bridge_port: u32, underlay: u32) -> Result<Attached, LoaderError> {
    let hooks = [
        (programs::EGRESS, bridge_port, TcAttachType::Egress),
        (programs::INGRESS, underlay, TcAttachType::Ingress),
    ];
    for (name, _, _) in hooks {
        classifier(ebpf, name)?.load().map_err(|source| {
            if is_permission_error(&source) {
                LoaderError::Permission
            } else {
                LoaderError::ProgramLoad { name, source }
            }
        })?;
    }
    set_jump_table(ebpf)?;
    let mut attached = Attached::default();
    for (name, iface, hook) in hooks {
        if !uses_tcx() {
            prepare_netlink(iface, hook, name, &mut attached)?;
        }
        classifier(ebpf, name)?
            .attach(iface, hook)
            .map_err(|source| LoaderError::Attach {
                name,
                iface,
                source,
            })?;
    }
    Ok(attached)
}

/// Points slot 0 of the jump table at the (loaded) encapsulation program, so long
/// floods continue in a tail call.
fn set_jump_table(ebpf: &mut Ebpf) -> Result<(), LoaderError> {
    let fd = classifier(ebpf, programs::EGRESS)?
        .fd()
        .map_err(|source| LoaderError::ProgramLoad {
            name: programs::EGRESS,
            source,
        })?
        .try_clone()
        .map_err(|e| LoaderError::JumpTable(MapError::IoError(e)))?;
    let map = ebpf
        .map_mut(JUMP_MAP)
        .ok_or(LoaderError::Program(JUMP_MAP))?;
    let mut jump = ProgramArray::try_from(map).map_err(LoaderError::JumpTable)?;
    jump.set(0, &fd, 0).map_err(LoaderError::JumpTable)
}

/// Netlink mode: removes a leftover filter of a previous run and makes sure a
/// `clsact` qdisc exists, remembering whether weft added it.
fn prepare_netlink(
    iface: u32,
    hook: TcAttachType,
    name: &str,
    attached: &mut Attached,
) -> Result<(), LoaderError> {
    let tc_err = |source| LoaderError::Tc { iface, source };
    match tc::qdisc_detach_program(iface, hook.into(), name) {
        Ok(()) => tracing::info!(iface, program = name, "removed a leftover TC filter"),
        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            // No clsact qdisc yet is the common case here; anything else is real.
            tracing::debug!(iface, error = %e, "no leftover TC filter to remove");
        }
    }
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => attached.clsact_added.push(iface),
        Err(e) if os_error(&e) == Some(libc::EEXIST) => {}
        Err(e) => return Err(tc_err(e)),
    }
    Ok(())
}
