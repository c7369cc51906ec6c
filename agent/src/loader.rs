//! Loads the embedded eBPF object, attaches its TC programs, and keeps both alive
//! without the agent: the datapath must keep forwarding while no agent runs (a
//! DaemonSet update, a crash, an OOM kill).
//!
//! State lives under a per-network-namespace directory on bpffs ([`PinDir`]):
//! - `maps-v<N>/` holds every map, pinned by name, for map layout version N
//!   ([`MAP_LAYOUT_VERSION`]). A starting agent of the same layout reuses them (the
//!   learned MACs, counters and peers survive); one of another layout gets maps of
//!   its own, and the older directory is removed once its programs are replaced.
//! - `links/<program>` pins each program's TCX link (kernel 6.6+). A starting agent
//!   swaps its freshly loaded program into the existing link (`BPF_LINK_UPDATE`):
//!   atomic, no packet sees the hook empty. Without a pinned link it attaches and
//!   pins a new one.
//!
//! With the fast datapath encrypted, two guard programs run on the underlay
//! interface too ([`attach_guards`], [`detach_guards`]): pinned as `links/<program>`
//! with TCX, netlink filters of their own names otherwise.
//!
//! Older kernels have no TCX: programs are netlink `cls_bpf` filters under a
//! `clsact` qdisc, which outlive the process by themselves; a starting agent
//! replaces the previous run's filters (not atomically: a gap of a few
//! milliseconds).

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    pin::PinError,
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcError},
    },
    util::KernelVersion,
};
use weft_common::{
    maps::{MAP_LAYOUT_VERSION, programs},
    netns,
};

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
    /// The pin directory could not be made or read.
    #[error(
        "bpffs directory {path}: is bpffs mounted at the --bpffs path (mount -t bpf bpf /sys/fs/bpf)?"
    )]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Another agent (or `weft reset`) holds this namespace's pin directory.
    #[error(
        "another weft agent (or weft reset) is running in this network namespace: {} is locked",
        .0.display()
    )]
    Locked(PathBuf),
    /// Pinning a link failed.
    #[error("pinning the link of {name} failed")]
    Pin {
        /// The program.
        name: &'static str,
        /// What failed.
        #[source]
        source: PinError,
    },
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
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
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

/// Where this network namespace's datapath state is pinned:
/// `<bpffs>/weft/netns-<cookie>`. The network namespace cookie (`SO_NETNS_COOKIE`)
/// is unique for the life of the system, unlike a namespace's inode number, so
/// agents in different namespaces (testbed hosts, the bench) never share or adopt
/// each other's state, and a new namespace never inherits a dead one's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// The directory for the calling thread's network namespace under `bpffs`.
    pub fn for_current_netns(bpffs: &Path) -> io::Result<Self> {
        Ok(Self::at(
            bpffs
                .join("weft")
                .join(netns::pin_dir_name(netns::cookie()?)),
        ))
    }

    /// The directory at `root`.
    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps of the current layout.
    fn maps(&self) -> PathBuf {
        self.root.join(format!("maps-v{MAP_LAYOUT_VERSION}"))
    }

    /// The pinned link of program `name`.
    fn link(&self, name: &str) -> PathBuf {
        self.root.join("links").join(name)
    }

    /// Creates the directory (if absent) and takes an exclusive lock on it, held
    /// until the returned file is dropped (or the process dies, `kill -9`
    /// included): one agent, or `weft reset`, per network namespace at a time.
    pub fn lock(&self) -> Result<std::fs::File, LoaderError> {
        std::fs::create_dir_all(&self.root).map_err(|source| self.dir_error(source))?;
        let dir = std::fs::File::open(&self.root).map_err(|source| self.dir_error(source))?;
        match dir.try_lock() {
            Ok(()) => Ok(dir),
            Err(std::fs::TryLockError::WouldBlock) => Err(LoaderError::Locked(self.root.clone())),
            Err(std::fs::TryLockError::Error(source)) => Err(self.dir_error(source)),
        }
    }

    fn dir_error(&self, source: io::Error) -> LoaderError {
        if matches!(
            source.raw_os_error(),
            Some(libc::EPERM) | Some(libc::EACCES)
        ) {
            LoaderError::Permission
        } else {
            LoaderError::PinDir {
                path: self.root.clone(),
                source,
            }
        }
    }

    /// Whether the directory holds nothing (no earlier run's datapath).
    pub fn is_empty(&self) -> bool {
        std::fs::read_dir(&self.root).map_or(true, |mut d| d.next().is_none())
    }

    /// Whether both programs' links are pinned here.
    pub fn has_links(&self) -> bool {
        HOOKS.iter().all(|(name, _)| self.link(name).exists())
    }

    /// Whether maps of the current layout are pinned here.
    pub fn maps_exist(&self) -> bool {
        self.maps().exists()
    }

    /// Unpins the maps of the current layout (absent is not an error).
    pub fn remove_maps(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(self.maps()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Unpins everything (the programs detach once nothing else holds their links).
    /// Absent is not an error.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes map directories of other layouts (after their programs were replaced).
    fn remove_other_layouts(&self) {
        let current = self.maps();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_maps = entry.file_name().to_string_lossy().starts_with("maps-v");
            if is_maps && path != current {
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => {
                        tracing::info!(dir = %path.display(), "removed maps of another layout")
                    }
                    Err(e) => {
                        tracing::warn!(dir = %path.display(), error = %e, "removing old maps")
                    }
                }
            }
        }
    }
}

/// Loads the embedded object (or the object file `object`) with its maps under
/// `pins` (reusing the maps pinned there by an earlier run of the same layout,
/// creating them otherwise). Programs are not loaded yet.
pub fn load(pins: &PinDir, object: Option<&Path>) -> Result<Ebpf, LoaderError> {
    if object.is_none() && EBPF_OBJECT.is_empty() {
        return Err(LoaderError::NotEmbedded);
    }
    let maps = pins.maps();
    for dir in [maps.clone(), pins.root.join("links")] {
        std::fs::create_dir_all(&dir).map_err(|source| pins.dir_error(source))?;
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&maps);
    match object {
        Some(path) => loader.load_file(path),
        None => loader.load(EBPF_OBJECT),
    }
    .map_err(|e| {
        if is_permission_error(&e) {
            LoaderError::Permission
        } else {
            LoaderError::Load(e)
        }
    })
}

/// Where the programs run: encapsulation on egress of weft's device, decapsulation
/// on its ingress.
const HOOKS: [(&str, TcAttachType); 2] = [
    (programs::EGRESS, TcAttachType::Egress),
    (programs::INGRESS, TcAttachType::Ingress),
];

/// Whether TC programs attach through TCX links (else netlink filters).
pub fn uses_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// What attaching did.
#[derive(Debug, Default)]
pub struct Attached {
    /// Programs swapped into links an earlier run pinned (restart or upgrade).
    pub replaced: Vec<&'static str>,
}

/// Loads `prog` (named `name`) into the kernel.
fn load_program(prog: &mut SchedClassifier, name: &'static str) -> Result<(), LoaderError> {
    prog.load().map_err(|source| {
        if is_permission_error(&source) {
            LoaderError::Permission
        } else {
            LoaderError::ProgramLoad { name, source }
        }
    })
}

/// Netlink mode: attaches `prog` as a filter named `name` on `hook` of `ifindex`,
/// replacing a leftover one, and leaves it there when this process exits.
fn attach_netlink(
    prog: &mut SchedClassifier,
    ifindex: u32,
    hook: TcAttachType,
    name: &'static str,
) -> Result<(), LoaderError> {
    let attach_err = |source| LoaderError::Attach {
        name,
        iface: ifindex,
        source,
    };
    prepare_netlink(ifindex, hook, name)?;
    let id = prog.attach(ifindex, hook).map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    // The filter must outlive the process, and dropping its handle would delete
    // it: the handle holds no resource of this process (only the interface,
    // parent, priority and handle numbers), so forget it.
    std::mem::forget(link);
    Ok(())
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

/// Loads both programs and puts them on weft's VXLAN device (`ifindex`): encap on
/// egress, decap on ingress. With TCX, a link pinned by an earlier run gets the new
/// program atomically; otherwise a new link is attached and pinned, so the programs
/// stay attached after this process exits. Maps of other layouts are then removed.
pub fn attach(ebpf: &mut Ebpf, pins: &PinDir, ifindex: u32) -> Result<Attached, LoaderError> {
    for (name, _) in HOOKS {
        load_program(classifier(ebpf, name)?, name)?;
    }
    let mut attached = Attached::default();
    let mut pinned_now = Vec::new();
    if let Err(e) = attach_all(ebpf, pins, ifindex, &mut attached, &mut pinned_now) {
        // Unpin what this call pinned: those links detach with their pins.
        for path in pinned_now {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    pins.remove_other_layouts();
    Ok(attached)
}

/// Attaches both programs (see [`attach`]), recording each link it pins anew.
fn attach_all(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    ifindex: u32,
    attached: &mut Attached,
    pinned_now: &mut Vec<PathBuf>,
) -> Result<(), LoaderError> {
    for (name, hook) in HOOKS {
        let prog = classifier(ebpf, name)?;
        let attach_err = |source| LoaderError::Attach {
            name,
            iface: ifindex,
            source,
        };
        if !uses_tcx() {
            attach_netlink(prog, ifindex, hook, name)?;
            continue;
        }
        let path = pins.link(name);
        if replace_pinned(prog, &path, name)? {
            attached.replaced.push(name);
            continue;
        }
        let id = prog.attach(ifindex, hook).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|e| attach_err(ProgramError::from(e)))?;
        // The pin holds the link; this process's fd closes when `_pinned` drops.
        let _pinned = fd_link
            .pin(&path)
            .map_err(|source| LoaderError::Pin { name, source })?;
        pinned_now.push(path);
    }
    Ok(())
}

/// Swaps `prog` into the link pinned at `path`, if there is a live one. A pin of a
/// link whose device is gone (the link is defunct) is removed, and `false` returned.
fn replace_pinned(
    prog: &mut SchedClassifier,
    path: &Path,
    name: &'static str,
) -> Result<bool, LoaderError> {
    let pinned = match PinnedLink::from_pin(path) {
        Ok(p) => p,
        Err(_) => return Ok(false),
    };
    let link = SchedClassifierLink::try_from(FdLink::from(pinned));
    let result = match link {
        Ok(link) => prog.attach_to_link(link).and_then(|id| prog.take_link(id)),
        Err(e) => Err(ProgramError::from(e)),
    };
    match result {
        // Dropping the taken link closes this process's fd; the pin keeps it.
        Ok(_link) => Ok(true),
        Err(e) => {
            tracing::info!(program = name, error = %e, "pinned link is stale; attaching anew");
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != io::ErrorKind::NotFound
            {
                return Err(LoaderError::PinDir {
                    path: path.to_owned(),
                    source: e,
                });
            }
            Ok(false)
        }
    }
}

/// Where the underlay guards run: [`programs::GUARD_EGRESS`] on egress,
/// [`programs::GUARD_INGRESS`] on ingress.
const GUARD_HOOKS: [(&str, TcAttachType); 2] = [
    (programs::GUARD_EGRESS, TcAttachType::Egress),
    (programs::GUARD_INGRESS, TcAttachType::Ingress),
];

/// Loads the underlay guards and puts them on the underlay interface `ifindex`
/// (only while the fast datapath is encrypted). With TCX each gets a new link,
/// pinned over the previous run's pin (a rename: the old link, perhaps on another
/// interface, detaches as its pin goes, after the new one runs already). With
/// netlink filters the previous run's filter of the same name is replaced; a
/// `clsact` qdisc is added if the interface has none, and is never removed (other
/// agents may use it).
pub fn attach_guards(ebpf: &mut Ebpf, pins: &PinDir, ifindex: u32) -> Result<(), LoaderError> {
    for (name, hook) in GUARD_HOOKS {
        let prog = classifier(ebpf, name)?;
        load_program(prog, name)?;
        if !uses_tcx() {
            attach_netlink(prog, ifindex, hook, name)?;
            continue;
        }
        let attach_err = |source| LoaderError::Attach {
            name,
            iface: ifindex,
            source,
        };
        let id = prog.attach(ifindex, hook).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|e| attach_err(ProgramError::from(e)))?;
        let path = pins.link(name);
        // bpffs refuses names with a dot.
        let fresh = pins.link(&format!("{name}-new"));
        let _ = std::fs::remove_file(&fresh);
        let _pinned = fd_link
            .pin(&fresh)
            .map_err(|source| LoaderError::Pin { name, source })?;
        std::fs::rename(&fresh, &path).map_err(|source| {
            let _ = std::fs::remove_file(&fresh);
            LoaderError::PinDir {
                path: path.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Removes the underlay guards (fast datapath not encrypted, or `weft reset`):
/// their pinned TCX links, and with netlink filters those of their names on every
/// interface of `ifindexes` (the underlay may have been another one in an earlier
/// run). Never removes a `clsact` qdisc. Returns how many it removed; failures are
/// logged, not returned (there may be nothing to remove).
pub fn detach_guards(pins: &PinDir, ifindexes: impl IntoIterator<Item = u32>) -> usize {
    let mut removed = 0;
    for (name, _) in GUARD_HOOKS {
        match std::fs::remove_file(pins.link(name)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(program = name, error = %e, "unpinning a guard's link"),
        }
    }
    if uses_tcx() {
        return removed;
    }
    for ifindex in ifindexes {
        for (name, hook) in GUARD_HOOKS {
            match tc::qdisc_detach_program(ifindex, hook.into(), name) {
                Ok(()) => removed += 1,
                // Most interfaces have no clsact qdisc or no such filter.
                Err(e) => tracing::debug!(ifindex, program = name, error = %e, "no guard filter"),
            }
        }
    }
    removed
}

/// Netlink mode: removes a leftover filter of a previous run and makes sure a
/// `clsact` qdisc exists (on weft's own device, so it goes with the device).
fn prepare_netlink(iface: u32, hook: TcAttachType, name: &str) -> Result<(), LoaderError> {
    let tc_err = |source| LoaderError::Tc { iface, source };
    match tc::qdisc_detach_program(iface, hook.into(), name) {
        Ok(()) => tracing::info!(iface, program = name, "removed a leftover TC filter"),
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            // No clsact qdisc yet is the common case here; anything else is real.
            tracing::debug!(iface, error = %e, "no leftover TC filter to remove");
        }
    }
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => {}
        Err(e) if os_error(&e) == Some(libc::EEXIST) => {}
        Err(e) => return Err(tc_err(e)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::tap::testnet;

    /// Names of the programs TCX runs on hook `hook` of `ifindex` (kernel names: cut at
    /// 15 bytes).
    fn tcx_names(ifindex: u32, hook: TcAttachType) -> Vec<String> {
        let (_, infos) = SchedClassifier::query_tcx(ifindex, hook).expect("TCX query");
        infos
            .iter()
            .map(|i| i.name_as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits (a released link detaches from a kernel work item) until both hooks of
    /// `ifindex` run exactly `want` (egress, ingress).
    fn wait_hooks(ifindex: u32, want: (&[&str], &[&str])) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = (
                tcx_names(ifindex, TcAttachType::Egress),
                tcx_names(ifindex, TcAttachType::Ingress),
            );
            if got.0 == want.0 && got.1 == want.1 {
                return;
            }
            assert!(Instant::now() < deadline, "hooks: {got:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// With TCX: the guards attach to an interface, a second attach (an agent's
    /// restart) replaces them rather than adding to them, and detaching removes them.
    #[test]
    fn guards_attach_replace_and_detach_with_tcx() {
        if EBPF_OBJECT.is_empty() || !uses_tcx() {
            println!("skipping: no embedded eBPF object, or no TCX on this kernel");
            return;
        }
        testnet::in_netns("guards_attach_replace_and_detach_with_tcx", || {
            testnet::set_up("lo", 0);
            let root = PathBuf::from(format!(
                "/sys/fs/bpf/weft-test-guards-{}",
                std::process::id()
            ));
            let pins = PinDir::at(root);
            let lo = 1;
            let guards: (&[&str], &[&str]) = (&["weft_guard_egre"], &["weft_guard_ingr"]);
            let mut first = load(&pins, None).expect("load");
            attach_guards(&mut first, &pins, lo).expect("attach");
            wait_hooks(lo, guards);
            let mut second = load(&pins, None).expect("load again");
            attach_guards(&mut second, &pins, lo).expect("attach again");
            drop((first, second));
            wait_hooks(lo, guards);
            assert_eq!(detach_guards(&pins, [lo]), 2);
            wait_hooks(lo, (&[], &[]));
            assert_eq!(detach_guards(&pins, [lo]), 0, "nothing left to detach");
            pins.remove().expect("removing the pins");
        });
    }
}
