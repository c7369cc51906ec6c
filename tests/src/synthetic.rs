//! Synthetic packets and a private, loaded-but-unattached datapath, for running the
//! eBPF programs through `BPF_PROG_TEST_RUN` (the eBPF tests and the benchmark's
//! per-packet costs share them).
//!
//! The scene: this host is ShortID 1 at 192.168.48.11 on `ul0`, with a
//! metadata-mode VXLAN device `vx0` (what the agent's `weft-vxlan` is) that flood
//! copies are sent through; peers 2 and 3 sit at .12 and .13 (static neighbour
//! entries, so encapsulated copies leave `ul0` at once); a pod behind peer 2 has MAC
//! [`POD_REMOTE`], a local pod [`POD_LOCAL`]. Frames leaving `ul0` arrive on its
//! veth peer `ul0p`, where a [`PacketTap`] can read them.

use std::{
    ffi::CStr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData},
    programs::SchedClassifier,
};
use weft_common::{
    maps::{
        CONFIG_MAP, DatapathConfig, FLOOD_MAP, MACS_MAP, MacEntry, MacKey, PEERS_MAP, PeerEntry,
        programs,
    },
    wire::{VXLAN_PORT, ipv4_checksum},
};

/// This host's underlay address.
pub const LOCAL: [u8; 4] = [192, 168, 48, 11];
/// Peer 2's underlay address.
pub const PEER2: [u8; 4] = [192, 168, 48, 12];
/// Peer 3's underlay address.
pub const PEER3: [u8; 4] = [192, 168, 48, 13];
/// MAC of peer 2 (a static neighbour entry on `ul0`).
pub const PEER2_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x12];
/// MAC of peer 3 (a static neighbour entry on `ul0`).
pub const PEER3_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x13];
/// The gateway 192.168.48.1 through which [`FAR_PEERS`] are routed.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
/// Peers outside the underlay's prefix, routed through the gateway.
pub const FAR_PEERS: &str = "10.99.0.0/16";
/// MAC of this host's underlay interface `ul0`.
pub const UL0_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x11];
/// A pod on this host.
pub const POD_LOCAL: [u8; 6] = [0x02, 0x11, 0, 0, 0, 1];
/// A pod behind peer 2.
pub const POD_REMOTE: [u8; 6] = [0x02, 0x22, 0, 0, 0, 1];
/// The overlay MTU configured.
pub const MTU: u16 = 1376;

/// Moves the calling thread into a fresh network namespace holding `ul0`, a veth
/// whose peer `ul0p` swallows whatever leaves, and `vx0`, a metadata-mode VXLAN
/// device on UDP 6784; returns `vx0`'s ifindex. Commands started from this thread
/// afterwards run in that namespace; it dies with the thread.
pub fn private_underlay() -> Result<u32> {
    // SAFETY: unshare(CLONE_NEWNET) changes only the calling thread's namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    // The kernel here has no dummy driver: a veth pair serves.
    let ul0 = [
        "link",
        "add",
        "ul0",
        "address",
        "02:aa:00:00:00:11",
        "type",
        "veth",
        "peer",
        "name",
        "ul0p",
    ];
    let port = VXLAN_PORT.to_string();
    let vx0 = [
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "external",
        "dstport",
        &port,
        "nolearning",
    ];
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let (peer2, peer3, gw) = (mac(PEER2_MAC), mac(PEER3_MAC), mac(GATEWAY_MAC));
    let neigh = |ip: &'static str, lladdr: &str| {
        [
            "neigh",
            "replace",
            ip,
            "lladdr",
            lladdr,
            "dev",
            "ul0",
            "nud",
            "permanent",
        ]
        .map(str::to_owned)
    };
    let neighbours = [
        neigh("192.168.48.12", &peer2),
        neigh("192.168.48.13", &peer3),
        neigh("192.168.48.1", &gw),
    ];
    let mut steps: Vec<Vec<String>> = [
        &["link", "set", "lo", "up"][..],
        &ul0,
        &["addr", "add", "192.168.48.11/24", "dev", "ul0"],
        &["link", "set", "ul0p", "up"],
        &["link", "set", "ul0", "up"],
        &vx0,
        &["link", "set", "vx0", "up"],
    ]
    .iter()
    .map(|a| a.iter().map(|s| s.to_string()).collect())
    .collect();
    steps.extend(neighbours.iter().map(|a| a.to_vec()));
    steps.push(
        [
            "route",
            "add",
            FAR_PEERS,
            "via",
            "192.168.48.1",
            "dev",
            "ul0",
        ]
        .map(str::to_owned)
        .to_vec(),
    );
    // No IPv6: vx0's own router solicitations and MLD reports would be flooded to
    // the peers like any multicast frame and show up among the copies.
    for key in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        let out = Command::new("sysctl")
            .args(["-q", "-w", key])
            .output()
            .context("cannot run `sysctl`")?;
        ensure!(
            out.status.success(),
            "`sysctl -w {key}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    for args in &steps {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("cannot run `ip`")?;
        ensure!(
            out.status.success(),
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Without TCX (kernels before 6.6) TC programs attach as netlink filters, under a
    // `clsact` qdisc that must exist first (the agent adds one to its device likewise).
    if !crate::tcx_supported() {
        let out = Command::new("tc")
            .args(["qdisc", "add", "dev", "vx0", "clsact"])
            .output()
            .context("cannot run `tc`")?;
        ensure!(
            out.status.success(),
            "`tc qdisc add dev vx0 clsact` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    ifindex(c"vx0")
}

/// The ifindex of `name` in the calling thread's namespace.
pub fn ifindex(name: &CStr) -> Result<u32> {
    // SAFETY: a valid NUL-terminated name, looked up in this thread's namespace.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "{name:?} has no ifindex");
    Ok(index)
}

/// A private pin directory on bpffs for a loaded test datapath (the object's maps
/// are pinned by name), removed on drop.
#[derive(Debug)]
pub struct TempPins {
    dir: PathBuf,
}

impl TempPins {
    /// Creates `/sys/fs/bpf/weft-test-<pid>-<n>`.
    pub fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/weft-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "creating {} (is bpffs mounted at /sys/fs/bpf? `cargo xtask setup` mounts it)",
                dir.display()
            )
        })?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A raw `AF_PACKET` socket that receives every frame arriving on one interface of
/// the calling thread's namespace (non-blocking; read with [`PacketTap::collect`]).
#[derive(Debug)]
pub struct PacketTap {
    fd: OwnedFd,
}

impl PacketTap {
    /// Opens a tap on interface `name`.
    pub fn open(name: &CStr) -> Result<Self> {
        let index = ifindex(name)?;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: a plain socket(2) call; the descriptor is owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        ensure!(
            raw >= 0,
            "socket(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // A flood to hundreds of peers arrives in one burst: room for all of it (the
        // default buffer holds a few hundred small frames). FORCE: root may exceed
        // rmem_max.
        let size: libc::c_int = 16 << 20;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `size`.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        ensure!(
            rc == 0,
            "setsockopt(SO_RCVBUFFORCE): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: all-zero is a valid sockaddr_ll; the fields that matter are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        ensure!(
            rc == 0,
            "bind(AF_PACKET, {name:?}): {}",
            std::io::Error::last_os_error()
        );
        Ok(Self { fd })
    }

    /// Reads frames for which `keep` holds until `want` of them arrived or `timeout`
    /// passed; returns those kept.
    pub fn collect(
        &self,
        want: usize,
        timeout: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        while frames.len() < want && Instant::now() < deadline {
            // SAFETY: `buf` is valid for writes of its whole length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                let frame = &buf[..n as usize];
                if keep(frame) {
                    frames.push(frame.to_vec());
                }
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        frames
    }
}

/// Loads the eBPF object at `object` with its maps pinned under `pins` (a private
/// directory: see [`TempPins`]) and every program, the underlay guards included
/// (verified, not attached).
pub fn load_datapath(object: &Path, pins: &Path) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins)
        .load_file(object)
        .with_context(|| format!("loading {}", object.display()))?;
    for name in [
        programs::EGRESS,
        programs::INGRESS,
        programs::GUARD_EGRESS,
        programs::GUARD_INGRESS,
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        prog.load()
            .map_err(|e| anyhow!("the verifier rejected {name}: {e:#?}"))?;
    }
    Ok(ebpf)
}

/// A map of `ebpf` by name.
pub fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("the eBPF object has no map {name}"))
}

/// The configuration of the scene (`vxlan` = `vx0`'s ifindex), with `flood_count`
/// flood-list entries.
pub fn config(vxlan: u32, flood_count: u16) -> DatapathConfig {
    DatapathConfig {
        enabled: 1,
        vxlan_ifindex: vxlan,
        local_addr: LOCAL,
        local_short_id: 1,
        mtu: MTU,
        flood_count,
        vxlan_port: VXLAN_PORT,
        mac_age_secs: 300,
        sleeve_ifindex: 0,
    }
}

/// Writes peer `id` at `addr`.
pub fn set_peer(ebpf: &mut Ebpf, id: u32, addr: [u8; 4]) -> Result<()> {
    set_peer_flags(ebpf, id, addr, 0)
}

/// Writes peer `id` at `addr` with `flags` (`weft_common::maps::PEER_SLEEVE`).
pub fn set_peer_flags(ebpf: &mut Ebpf, id: u32, addr: [u8; 4], flags: u32) -> Result<()> {
    let mut peers: Array<&mut MapData, PeerEntry> = Array::try_from(map_mut(ebpf, PEERS_MAP)?)?;
    peers.set(id, &PeerEntry { addr, flags }, 0)?;
    Ok(())
}

/// Fills the maps with the scene: configuration, peers 2 and 3, both in the flood
/// list.
pub fn fill_scene(ebpf: &mut Ebpf, vxlan: u32) -> Result<()> {
    let mut cfg: Array<&mut MapData, DatapathConfig> = Array::try_from(map_mut(ebpf, CONFIG_MAP)?)?;
    cfg.set(0, &config(vxlan, 2), 0)?;
    set_peer(ebpf, 2, PEER2)?;
    set_peer(ebpf, 3, PEER3)?;
    let mut flood: Array<&mut MapData, u32> = Array::try_from(map_mut(ebpf, FLOOD_MAP)?)?;
    flood.set(0, &2, 0)?;
    flood.set(1, &3, 0)?;
    Ok(())
}

/// Records `mac` as learned behind peer `id` just now.
pub fn learn(ebpf: &mut Ebpf, mac: [u8; 6], id: u32) -> Result<()> {
    let mut macs: HashMap<&mut MapData, MacKey, MacEntry> =
        HashMap::try_from(map_mut(ebpf, MACS_MAP)?)?;
    let entry = MacEntry {
        short_id: id,
        pad: 0,
        seen_ns: monotonic_ns(),
    };
    macs.insert(&MacKey::new(mac), &entry, 0)?;
    Ok(())
}

/// `CLOCK_MONOTONIC` in nanoseconds (the base of the datapath's MAC times).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An Ethernet/IPv4/UDP frame from `src` to `dst` (pod 10.32.1.1 -> 10.32.2.1) with
/// `payload_len` payload bytes.
pub fn inner_frame(dst: [u8; 6], src: [u8; 6], payload_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 28 + payload_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload_len) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 32, 1, 1]);
    ip[16..20].copy_from_slice(&[10, 32, 2, 1]);
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&5000u16.to_be_bytes());
    f.extend_from_slice(&6000u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..payload_len).map(|i| i as u8));
    f
}

/// A broadcast ARP request from `src` (padded to the 60-byte Ethernet minimum).
pub fn arp_request(src: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[10, 32, 1, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 32, 2, 1]);
    f.resize(60, 0);
    f
}
