//! The sleeve's TAP device: a port of the `weave` bridge through which the agent
//! reads pod frames to send to peers and writes frames received from them.
//!
//! The device is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and offloads on
//! (`TUNSETOFFLOAD`: checksum, TSO4/6 with ECN, and USO4/6 when the kernel takes
//! them), so a pod's TCP send arrives as one up-to-64 KB super-packet with a partial
//! checksum in one read, and a super-packet built by the coalescer goes back in one
//! write. See [`crate::offload`] for what is done with them.
//!
//! Choices:
//! - The legacy 10-byte `virtio_net_hdr` (`TUNSETVNETHDRSZ` 10): `num_buffers` of the
//!   12-byte v1 header only means something for mergeable receive buffers of virtio
//!   devices, and 10 is the kernel's default for TAPs. Integers are little-endian
//!   (`TUNSETVNETLE`).
//! - Not persistent: the device goes away when its file descriptor is closed (when the
//!   agent exits), and the agent creates it again when it starts. Frames in flight are
//!   lost either way; nothing stale is left behind.
//! - One queue (no `IFF_MULTI_QUEUE`): one reader and one writer thread are what two
//!   cores give. Multi-queue is a flag away when more cores want their own queue.
//! - The file descriptor is blocking by default; [`Tap::set_nonblocking`] switches it
//!   for use with a poller.
//!
//! Attaching the device to the bridge, setting its MTU and bringing it up are done
//! through rtnetlink by the agent, like its other links (the MTU can also be given to
//! [`Tap::create`], which sets it with an ioctl).

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use crate::offload::{OffloadError, VIRTIO_NET_HDR_LEN, VirtioNetHdr};

/// A read buffer of this size holds any frame the TAP gives: the vnet header, a
/// 64 KB IP packet and an Ethernet header with a VLAN tag.
pub const READ_BUF_LEN: usize = VIRTIO_NET_HDR_LEN + 65536 + 18;

/// What opening or configuring the TAP device failed at.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long for an interface name, or has a NUL byte.
    #[error("invalid interface name {0:?}")]
    BadName(String),
    /// Opening `/dev/net/tun` failed.
    #[error("opening /dev/net/tun failed")]
    Open(#[source] io::Error),
    /// An ioctl failed.
    #[error("{0} on TAP device {1} failed")]
    Ioctl(&'static str, String, #[source] io::Error),
}

/// Offloads the kernel accepted for the TAP (`TUN_F_*` bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads(pub u32);

impl Offloads {
    /// Checksum offload: frames may have partial checksums.
    pub fn csum(self) -> bool {
        self.0 & libc::TUN_F_CSUM != 0
    }
    /// TCP segmentation offload, IPv4 and IPv6.
    pub fn tso(self) -> bool {
        self.0 & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) == libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    }
    /// UDP segmentation offload, IPv4 and IPv6 (kernel 6.2 and later).
    pub fn uso(self) -> bool {
        self.0 & (libc::TUN_F_USO4 | libc::TUN_F_USO6) == libc::TUN_F_USO4 | libc::TUN_F_USO6
    }
}

/// An open TAP device with a vnet header and offloads.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    offloads: Offloads,
}

/// `struct ifreq`: the name, then a 24-byte union of which weft uses `ifr_flags` (a
/// short) and `ifr_mtu` (an int), both at its start.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::BadName(name.to_owned()));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        for (d, s) in req.name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        Ok(req)
    }

    fn set_flags(&mut self, flags: libc::c_short) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .take_while(|c| **c != 0)
            // c_char is i8 on x86_64 and u8 on aarch64: take the byte either way.
            .map(|c| c.to_ne_bytes()[0])
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// An ioctl whose argument is a pointer to `arg`.
fn ioctl_ptr<T>(fd: RawFd, req: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed value of the type the request
    // reads or writes (the callers pair each request with its argument type).
    let r = unsafe { libc::ioctl(fd, req, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An ioctl whose argument is an integer passed by value.
fn ioctl_val(fd: RawFd, req: libc::Ioctl, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the request takes its argument by value (TUNSETOFFLOAD); no memory is
    // passed.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A throwaway socket for interface ioctls (`SIOC*`).
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Tap {
    /// The offloads asked of the kernel, best first: with USO, then without (kernels
    /// before 6.2 refuse USO with EINVAL).
    const OFFLOADS: [u32; 2] = [
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_USO4
            | libc::TUN_F_USO6,
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
    ];

    /// Creates the TAP device `name` with a vnet header and offloads, and sets its MTU
    /// if given. The device is down and on no bridge; it goes away when the returned
    /// value is dropped. Fails if `name` is a device other than a free TAP.
    pub fn create(name: &str, mtu: Option<u32>) -> Result<Self, TapError> {
        let mut req = IfReq::new(name)?;
        let path = c"/dev/net/tun";
        // SAFETY: `path` is a NUL-terminated string; the result is checked.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(TapError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        let err = |what: &'static str| move |e| TapError::Ioctl(what, name.to_owned(), e);

        req.set_flags((libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short);
        ioctl_ptr(raw, libc::TUNSETIFF, &mut req).map_err(err("TUNSETIFF"))?;
        let name = req.name();
        let err = |what: &'static str| {
            let name = name.clone();
            move |e| TapError::Ioctl(what, name, e)
        };

        let mut hdr_len = VIRTIO_NET_HDR_LEN as libc::c_int;
        ioctl_ptr(raw, libc::TUNSETVNETHDRSZ, &mut hdr_len).map_err(err("TUNSETVNETHDRSZ"))?;
        let mut le: libc::c_int = 1;
        if let Err(e) = ioctl_ptr(raw, libc::TUNSETVNETLE, &mut le) {
            // Little-endian is the legacy header's native order on little-endian
            // hosts; only others need the ioctl.
            if cfg!(target_endian = "big") {
                return Err(err("TUNSETVNETLE")(e));
            }
        }
        let mut offloads = None;
        let mut last = None;
        for want in Self::OFFLOADS {
            match ioctl_val(raw, libc::TUNSETOFFLOAD, libc::c_ulong::from(want)) {
                Ok(()) => {
                    offloads = Some(Offloads(want));
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(offloads) = offloads else {
            return Err(err("TUNSETOFFLOAD")(
                last.unwrap_or_else(|| io::Error::from(io::ErrorKind::Unsupported)),
            ));
        };
        let tap = Tap { fd, name, offloads };
        if let Some(mtu) = mtu {
            tap.set_mtu(mtu)?;
        }
        Ok(tap)
    }

    /// The interface name (as the kernel gave it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads the kernel accepted.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// The interface index.
    pub fn ifindex(&self) -> Result<u32, TapError> {
        let name =
            CString::new(self.name.as_str()).map_err(|_| TapError::BadName(self.name.clone()))?;
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(TapError::Ioctl(
                "if_nametoindex",
                self.name.clone(),
                io::Error::last_os_error(),
            ));
        }
        Ok(index)
    }

    /// Sets the MTU (`SIOCSIFMTU`).
    pub fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        let err = |e| TapError::Ioctl("SIOCSIFMTU", self.name.clone(), e);
        let sock = ioctl_socket().map_err(err)?;
        let mut req = IfReq::new(&self.name)?;
        req.set_int(
            libc::c_int::try_from(mtu)
                .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?,
        );
        // The libc crate types this request c_ulong for musl, whose ioctl takes an int.
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFMTU as libc::Ioctl, &mut req).map_err(err)
    }

    /// Makes reads and writes nonblocking (`EAGAIN` instead of waiting) or blocking.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_GETFL on a descriptor this value owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: F_SETFL with flags derived from the current ones.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame into `buf` (use [`READ_BUF_LEN`] bytes): the vnet header, then
    /// the frame at `buf[VIRTIO_NET_HDR_LEN..][..len]`. Returns the parsed header and
    /// the frame's length.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<(VirtioNetHdr, usize)> {
        // SAFETY: `buf` is a valid writable region of `buf.len()` bytes for the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let hdr = VirtioNetHdr::decode(&buf[..n])
            .map_err(|e: OffloadError| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok((hdr, n - VIRTIO_NET_HDR_LEN))
    }

    /// Writes one frame with its vnet header (one `writev`, no copy). The kernel takes
    /// a frame whole or not at all.
    pub fn write(&self, hdr: &VirtioNetHdr, frame: &[u8]) -> io::Result<()> {
        let h = hdr.encode();
        let iov = [
            libc::iovec {
                iov_base: h.as_ptr() as *mut libc::c_void,
                iov_len: h.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths, which the
        // kernel only reads.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != h.len() + frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to the TAP",
            ));
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Network namespaces and interface settings for root-only tests.
#[cfg(test)]
pub(crate) mod testnet {
    use std::{io, net::Ipv4Addr, os::fd::AsRawFd};

    use super::{IfReq, ioctl_ptr, ioctl_socket};

    /// Runs `f` on a new thread in a new network namespace (netns membership is per
    /// thread), propagating its panics; prints why and returns if not root.
    pub(crate) fn in_netns(test: &str, f: impl FnOnce() + Send + 'static) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipping {test}: needs root (a network namespace, /dev/net/tun)");
            return;
        }
        let r = std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread's namespaces.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            f();
        })
        .join();
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    }

    fn ifreq_ioctl(name: &str, req: libc::Ioctl, fill: impl FnOnce(&mut IfReq)) -> IfReq {
        let sock = ioctl_socket().unwrap();
        let mut r = IfReq::new(name).unwrap();
        fill(&mut r);
        ioctl_ptr(sock.as_raw_fd(), req, &mut r).unwrap_or_else(|e| panic!("ioctl on {name}: {e}"));
        r
    }

    /// Sets IFF_UP and `extra` flags.
    pub(crate) fn set_up(name: &str, extra: libc::c_int) {
        let cur = ifreq_ioctl(name, libc::SIOCGIFFLAGS as libc::Ioctl, |_| {});
        let flags = libc::c_short::from_ne_bytes([cur.data[0], cur.data[1]]);
        let flags = flags | (libc::IFF_UP | extra) as libc::c_short;
        ifreq_ioctl(name, libc::SIOCSIFFLAGS as libc::Ioctl, |r| {
            r.set_flags(flags)
        });
    }

    /// Sets the MTU.
    pub(crate) fn set_mtu(name: &str, mtu: i32) {
        ifreq_ioctl(name, libc::SIOCSIFMTU as libc::Ioctl, |r| r.set_int(mtu));
    }

    fn sockaddr_in(a: Ipv4Addr) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        s[4..8].copy_from_slice(&a.octets());
        s
    }

    /// Sets an IPv4 address and prefix.
    pub(crate) fn set_ipv4(name: &str, addr: Ipv4Addr, prefix: u32) {
        ifreq_ioctl(name, libc::SIOCSIFADDR as libc::Ioctl, |r| {
            r.data[..16].copy_from_slice(&sockaddr_in(addr))
        });
        let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix).unwrap_or(0));
        ifreq_ioctl(name, libc::SIOCSIFNETMASK as libc::Ioctl, |r| {
            r.data[..16].copy_from_slice(&sockaddr_in(mask))
        });
    }

    /// The MAC address.
    pub(crate) fn mac(name: &str) -> [u8; 6] {
        let r = ifreq_ioctl(name, libc::SIOCGIFHWADDR as libc::Ioctl, |_| {});
        let mut m = [0u8; 6];
        m.copy_from_slice(&r.data[2..8]);
        m
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{Ipv4Addr, SocketAddr, TcpListener},
        time::{Duration, Instant},
    };

    use super::*;
    use crate::{
        offload::{Segmenter, TcpCoalescer, csum_combine, csum_partial},
        udp::{BatchSocket, SendMsg},
    };

    const LOCAL: [u8; 4] = [10, 99, 0, 1];
    const PEER: [u8; 4] = [10, 99, 0, 2];
    const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn pseudo4(ip: &[u8], proto: u8, len: usize) -> u16 {
        let mut s = csum_partial(&ip[12..20]);
        s = csum_combine(s, u16::from(proto));
        csum_combine(s, len as u16)
    }

    /// A complete IPv4 TCP frame from the peer to the local address.
    #[allow(clippy::too_many_arguments)]
    fn tcp_from_peer(
        dst_mac: [u8; 6],
        seq: u32,
        ack: u32,
        flags: u8,
        opts: &[u8],
        payload: &[u8],
        id: u16,
    ) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&PEER_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        let thl = 20 + opts.len();
        let total = 20 + thl + payload.len();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&PEER);
        f.extend_from_slice(&LOCAL);
        let c = !csum_partial(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&5000u16.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&ack.to_be_bytes());
        f.extend_from_slice(&[((thl / 4) as u8) << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(opts);
        f.extend_from_slice(payload);
        let c = !csum_combine(
            pseudo4(&f[14..], 6, thl + payload.len()),
            csum_partial(&f[34..]),
        );
        f[50..52].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// Reads one frame, waiting up to the deadline.
    fn read_until(tap: &Tap, buf: &mut [u8], deadline: Instant) -> Option<(VirtioNetHdr, usize)> {
        loop {
            match tap.read(buf) {
                Ok(r) => return Some(r),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("tap read: {e}"),
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut pfd = libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int + 1) };
        }
    }

    fn ip_ok(f: &[u8]) -> bool {
        csum_partial(&f[14..34]) == 0xffff
    }

    fn l4_ok(f: &[u8], proto: u8) -> bool {
        let len = f.len() - 34;
        csum_combine(pseudo4(&f[14..], proto, len), csum_partial(&f[34..])) == 0xffff
    }

    /// A TCP stream and a UDP GSO send through a TAP with offloads: the kernel hands
    /// the TAP super-packets (> MTU, GSO header), weft segments them into valid
    /// frames; a super-packet weft coalesced, written with NEEDS_CSUM, is delivered
    /// to the local socket.
    #[test]
    fn tap_offloads_in_a_netns() {
        testnet::in_netns("tap_offloads_in_a_netns", || {
            let tap = Tap::create("weft-t0", Some(1500)).unwrap();
            let off = tap.offloads();
            println!(
                "TUNSETOFFLOAD accepted {:#x} (csum {}, tso {}, uso {})",
                off.0,
                off.csum(),
                off.tso(),
                off.uso()
            );
            assert!(off.csum() && off.tso());
            assert!(tap.ifindex().unwrap() > 0);
            testnet::set_ipv4("weft-t0", Ipv4Addr::from(LOCAL), 24);
            testnet::set_up("weft-t0", libc::IFF_NOARP);
            let mac = testnet::mac("weft-t0");
            tap.set_nonblocking(true).unwrap();
            let mut buf = vec![0u8; READ_BUF_LEN];
            let deadline = Instant::now() + Duration::from_secs(5);

            // Handshake, the peer side played through the TAP.
            let listener = TcpListener::bind(SocketAddr::from((LOCAL, 5000))).unwrap();
            let syn_opts = [2, 4, 0x05, 0xb4, 1, 3, 3, 7]; // MSS 1460, NOP, WS 7
            let syn = tcp_from_peer(mac, 1000, 0, 0x02, &syn_opts, &[], 1);
            tap.write(&VirtioNetHdr::default(), &syn).unwrap();
            let is_from_local = |f: &[u8]| {
                f.len() >= 54
                    && f[12..14] == [8, 0]
                    && f[23] == 6
                    && f[26..30] == LOCAL
                    && f[36..38] == 40000u16.to_be_bytes()
            };
            let isn = loop {
                let (_, n) = read_until(&tap, &mut buf, deadline).expect("SYN-ACK");
                let f = &buf[VIRTIO_NET_HDR_LEN..][..n];
                if is_from_local(f) && f[47] == 0x12 {
                    break u32::from_be_bytes([f[38], f[39], f[40], f[41]]);
                }
            };
            let ack = tcp_from_peer(mac, 1001, isn + 1, 0x10, &[], &[], 2);
            tap.write(&VirtioNetHdr::default(), &ack).unwrap();
            let (mut stream, _) = listener.accept().unwrap();

            // Local -> peer: the kernel's TSO super-packets reach the TAP whole.
            let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            stream.set_nonblocking(true).unwrap();
            let sent = stream.write(&data).unwrap();
            let mut seg = Segmenter::new();
            let mut biggest = 0;
            let mut received = vec![false; sent];
            while biggest <= 1514 {
                let (hdr, n) = read_until(&tap, &mut buf, deadline).expect("a GSO frame");
                let f = &buf[VIRTIO_NET_HDR_LEN..][..n];
                if !is_from_local(f) || n <= 54 {
                    continue;
                }
                if hdr.gso_type == VirtioNetHdr::GSO_TCPV4 {
                    assert_eq!(hdr.flags & VirtioNetHdr::F_NEEDS_CSUM, 1);
                    biggest = biggest.max(n);
                    println!(
                        "read a TSO frame of {n} bytes, gso_size {}, hdr_len {}",
                        hdr.gso_size, hdr.hdr_len
                    );
                }
                seg.segment(&hdr, f, 1438, &mut |s: &[u8]| {
                    assert!(s.len() <= 1438);
                    assert!(ip_ok(s) && l4_ok(s, 6), "segment checksums");
                    let seq = u32::from_be_bytes([s[38], s[39], s[40], s[41]]);
                    let off = seq.wrapping_sub(isn + 1) as usize;
                    let p = &s[54..];
                    assert_eq!(p, &data[off..off + p.len()], "payload at {off}");
                    received[off..off + p.len()]
                        .iter_mut()
                        .for_each(|r| *r = true);
                })
                .unwrap();
            }
            assert!(biggest > 1514);

            // Peer -> local: segments coalesced into one super-packet, one write.
            let payload: Vec<u8> = (0..30_000u32).map(|i| (i * 7 % 253) as u8).collect();
            let big = tcp_from_peer(mac, 1001, isn + 1, 0x18, &[], &payload, 3);
            let tso = VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                gso_type: VirtioNetHdr::GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1000,
                csum_start: 34,
                csum_offset: 16,
            };
            let mut segs = Vec::new();
            seg.segment(&tso, &big, 1438, &mut |s: &[u8]| segs.push(s.to_vec()))
                .unwrap();
            assert_eq!(segs.len(), 30);
            let mut co = TcpCoalescer::new();
            let mut writes = 0;
            let mut write = |h: &VirtioNetHdr, f: &[u8]| {
                assert_eq!(h.gso_type, VirtioNetHdr::GSO_TCPV4);
                tap.write(h, f).unwrap();
                writes += 1;
            };
            for s in &segs {
                co.push(s, &mut write);
            }
            co.flush(&mut write);
            assert_eq!(writes, 1, "one super-packet write");
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut got = vec![0u8; payload.len()];
            stream
                .read_exact(&mut got)
                .expect("the coalesced data reaches the socket");
            assert_eq!(got, payload);
            println!("a 30000-byte GSO write with NEEDS_CSUM was delivered to the local socket");

            // UDP GSO from a local socket: one USO frame on the TAP, if the kernel
            // took USO.
            if off.uso() {
                let udp = BatchSocket::bind(SocketAddr::from((LOCAL, 0)), false).unwrap();
                let run: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
                let msg = [SendMsg {
                    dst: SocketAddr::from((PEER, 6783)),
                    data: &run,
                    segment_size: Some(1000),
                }];
                assert_eq!(udp.send_batch(&msg).unwrap(), 1);
                let mut datagrams = Vec::new();
                while datagrams.len() < 5 {
                    let (hdr, n) = read_until(&tap, &mut buf, deadline).expect("the UDP frames");
                    let f = &buf[VIRTIO_NET_HDR_LEN..][..n];
                    if f[12..14] != [8, 0] || f[23] != 17 {
                        continue;
                    }
                    println!(
                        "read a UDP frame of {n} bytes, gso_type {}, gso_size {}",
                        hdr.gso_type, hdr.gso_size
                    );
                    assert_eq!(hdr.gso_type, VirtioNetHdr::GSO_UDP_L4, "USO on: one frame");
                    seg.segment(&hdr, f, 1438, &mut |s: &[u8]| {
                        assert!(ip_ok(s) && l4_ok(s, 17));
                        datagrams.push(s[42..].to_vec());
                    })
                    .unwrap();
                }
                assert_eq!(datagrams.concat(), run);
            }
        });
    }

    #[test]
    fn bad_names() {
        assert!(matches!(Tap::create("", None), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::create("a-name-far-too-long", None),
            Err(TapError::BadName(_))
        ));
    }
}
