//! The sleeve's UDP sockets (port 6783): batched receive (`recvmmsg`, with the source
//! of each datagram) and send (`sendmmsg`, a destination per datagram), UDP GSO
//! (`UDP_SEGMENT`: one send of a run of equal-sized datagrams to one destination) and
//! UDP GRO (`UDP_GRO`: one receive of a run of datagrams of one source, with their
//! size), and the DF bit.
//!
//! DF: Weave sends heartbeats, MTU probes and frames whose inner packet has DF with
//! DF set, everything else (the fragmentation test, non-DF frames) without. Linux has
//! no per-datagram DF for IPv4 sockets, so [`SleeveSockets`] holds two sockets bound
//! to the same address with `SO_REUSEPORT`: `main` (`IP_PMTUDISC_DONT`: no DF, the
//! kernel fragments) receives everything, because a classic BPF reuseport program that
//! returns 0 steers every datagram to the group's first socket; `df`
//! (`IP_PMTUDISC_DO`: DF set, `EMSGSIZE` for a datagram larger than the path MTU) only
//! sends. Both send from port 6783, with UDP checksums. After `EMSGSIZE`,
//! [`path_mtu`] reads the kernel's path MTU to the destination (`IP_MTU` on a
//! connected throwaway socket), as Weave does for its PMTU discovery.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// Weave's sleeve port.
pub const SLEEVE_PORT: u16 = 6783;
/// Most datagrams one UDP GSO send may carry (the kernel's `UDP_MAX_SEGMENTS` of
/// older kernels; newer ones allow more).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// A receive buffer of this size holds any GRO'd run of datagrams.
pub const GRO_BUF_LEN: usize = 65535;

/// DF policy of a socket (`IP_MTU_DISCOVER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pmtud {
    /// No DF; the kernel fragments (`IP_PMTUDISC_DONT`).
    Dont,
    /// DF on every datagram; `EMSGSIZE` above the path MTU (`IP_PMTUDISC_DO`).
    Do,
    /// DF on every datagram, path MTU ignored (up to the device MTU)
    /// (`IP_PMTUDISC_PROBE`).
    Probe,
}

/// One datagram (or, with `segment_size`, a run of datagrams) to send.
#[derive(Clone, Copy, Debug)]
pub struct SendMsg<'a> {
    /// Destination.
    pub dst: SocketAddr,
    /// The bytes: one datagram, or datagrams of `segment_size` bytes back to back
    /// (the last may be shorter).
    pub data: &'a [u8],
    /// UDP GSO: the size of each datagram in `data`.
    pub segment_size: Option<u16>,
}

/// What was received into one buffer of a [`RecvBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvMeta {
    /// Bytes received.
    pub len: usize,
    /// Source address.
    pub src: SocketAddr,
    /// UDP GRO: the buffer holds datagrams of this size back to back (the last may
    /// be shorter).
    pub segment_size: Option<u16>,
}

/// Buffers for [`BatchSocket::recv_batch`].
#[derive(Debug)]
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
}

impl RecvBatch {
    /// `count` buffers of `buf_len` bytes each ([`GRO_BUF_LEN`] with GRO on).
    pub fn new(count: usize, buf_len: usize) -> Self {
        Self {
            bufs: (0..count.max(1)).map(|_| vec![0; buf_len]).collect(),
            meta: Vec::with_capacity(count),
        }
    }

    /// What the last receive got, one entry per buffer filled.
    pub fn meta(&self) -> &[RecvMeta] {
        &self.meta
    }

    /// The bytes of buffer `i` of the last receive.
    pub fn data(&self, i: usize) -> &[u8] {
        let len = self.meta.get(i).map_or(0, |m| m.len);
        &self.bufs[i][..len]
    }

    /// The datagrams in buffer `i` (split by the GRO segment size).
    pub fn datagrams(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let data = self.data(i);
        let size = match self.meta.get(i).and_then(|m| m.segment_size) {
            Some(s) if s > 0 => usize::from(s),
            _ => data.len().max(1),
        };
        data.chunks(size)
    }

    /// The datagrams in buffer `i`, mutable (to open sealed datagrams in place).
    pub fn datagrams_mut(&mut self, i: usize) -> impl Iterator<Item = &mut [u8]> {
        let meta = self.meta.get(i).copied();
        let len = meta.map_or(0, |m| m.len);
        let size = match meta.and_then(|m| m.segment_size) {
            Some(s) if s > 0 => usize::from(s),
            _ => len.max(1),
        };
        self.bufs[i][..len].chunks_mut(size)
    }
}

/// A UDP socket with batched I/O.
#[derive(Debug)]
pub struct BatchSocket {
    fd: OwnedFd,
    v6: bool,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points at a live `T` of the size passed, as the option expects
    // (each caller pairs the option with its type).
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all-zero bytes are valid.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Control buffer for one `UDP_SEGMENT`/`UDP_GRO` message (8-byte aligned).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Cmsg([u8; 32]);

impl BatchSocket {
    /// An unbound UDP socket of the family.
    fn new(v6: bool) -> io::Result<Self> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = cvt(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: `fd` is a new descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, v6 })
    }

    /// A UDP socket bound to `addr`, with `SO_REUSEPORT` if `reuseport`.
    pub fn bind(addr: SocketAddr, reuseport: bool) -> io::Result<Self> {
        let s = Self::new(addr.is_ipv6())?;
        if reuseport {
            setsockopt(
                s.raw(),
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                &1 as &libc::c_int,
            )?;
        }
        let (ss, len) = to_sockaddr(&addr);
        // SAFETY: `ss` holds a sockaddr of `len` bytes.
        cvt(unsafe { libc::bind(s.raw(), (&ss as *const libc::sockaddr_storage).cast(), len) })?;
        Ok(s)
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        // SAFETY: all-zero bytes are a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `ss` and `len` are valid for writing; `len` is the buffer's size.
        cvt(unsafe {
            libc::getsockname(
                self.raw(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        })?;
        from_sockaddr(&ss).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
    }

    /// Sets the DF policy (`IP_MTU_DISCOVER` / `IPV6_MTU_DISCOVER`).
    pub fn set_pmtud(&self, mode: Pmtud) -> io::Result<()> {
        let v: libc::c_int = match mode {
            Pmtud::Dont => libc::IP_PMTUDISC_DONT,
            Pmtud::Do => libc::IP_PMTUDISC_DO,
            Pmtud::Probe => libc::IP_PMTUDISC_PROBE,
        };
        if self.v6 {
            setsockopt(self.raw(), libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, &v)
        } else {
            setsockopt(self.raw(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, &v)
        }
    }

    /// Turns UDP GRO on; `Ok(false)` if the kernel does not have it.
    pub fn enable_gro(&self) -> io::Result<bool> {
        match setsockopt(self.raw(), libc::SOL_UDP, libc::UDP_GRO, &1 as &libc::c_int) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets the receive and send buffer sizes (`SO_RCVBUF`/`SO_SNDBUF`; the kernel
    /// caps them at `net.core.{r,w}mem_max`).
    pub fn set_buffers(&self, bytes: usize) -> io::Result<()> {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        setsockopt(self.raw(), libc::SOL_SOCKET, libc::SO_RCVBUF, &v)?;
        setsockopt(self.raw(), libc::SOL_SOCKET, libc::SO_SNDBUF, &v)
    }

    /// Makes the socket nonblocking (or blocking).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let mut v: libc::c_int = on.into();
        // SAFETY: FIONBIO reads an int through the pointer, which is live.
        cvt(unsafe { libc::ioctl(self.raw(), libc::FIONBIO, &mut v) }).map(|_| ())
    }

    /// Sends the messages with one `sendmmsg`. Returns how many were sent: fewer than
    /// given when the socket buffer filled or a later message failed (send the rest
    /// again to learn why); an error if the first failed (`EMSGSIZE`: larger than the
    /// path MTU on a DF socket, `EAGAIN` when nonblocking and full).
    pub fn send_batch(&self, msgs: &[SendMsg<'_>]) -> io::Result<usize> {
        if msgs.is_empty() {
            return Ok(0);
        }
        let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
            msgs.iter().map(|m| to_sockaddr(&m.dst)).collect();
        let mut iovs: Vec<libc::iovec> = msgs
            .iter()
            .map(|m| libc::iovec {
                iov_base: m.data.as_ptr() as *mut libc::c_void,
                iov_len: m.data.len(),
            })
            .collect();
        let mut cmsgs = vec![Cmsg([0; 32]); msgs.len()];
        let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero lengths).
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut addrs[i].0 as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = addrs[i].1;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            if let Some(size) = m.segment_size {
                // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
                let (space, len) = unsafe {
                    (
                        libc::CMSG_SPACE(size_of::<u16>() as u32),
                        libc::CMSG_LEN(size_of::<u16>() as u32),
                    )
                };
                h.msg_control = cmsgs[i].0.as_mut_ptr().cast();
                // msghdr's length fields are size_t in glibc, socklen_t in musl.
                h.msg_controllen = space as _;
                // SAFETY: the control buffer is 32 bytes, 8-aligned, and `space`
                // (24) fits it, so CMSG_FIRSTHDR returns a valid cmsghdr pointer into
                // it, and CMSG_DATA has room for the u16 after the header.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = len as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
                }
            }
            hdrs.push(libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            });
        }
        // SAFETY: every mmsghdr points at address, iovec and control buffers that
        // live until the call returns, with their lengths; the data buffers are only
        // read.
        let n = cvt(unsafe {
            libc::sendmmsg(self.raw(), hdrs.as_mut_ptr(), hdrs.len() as libc::c_uint, 0)
        })?;
        Ok(n as usize)
    }

    /// Receives into the batch's buffers with one `recvmmsg` (waiting for the first
    /// datagram if the socket is blocking, taking only what is queued after it).
    /// Returns how many buffers were filled; see [`RecvBatch::meta`].
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let count = batch.bufs.len();
        // SAFETY: all-zero bytes are a valid sockaddr_storage.
        let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { zeroed() }; count];
        let mut iovs: Vec<libc::iovec> = batch
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut cmsgs = vec![Cmsg([0; 32]); count];
        let mut hdrs: Vec<libc::mmsghdr> = (0..count)
            .map(|i| {
                // SAFETY: all-zero bytes are a valid msghdr.
                let mut h: libc::msghdr = unsafe { zeroed() };
                h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_iov = &mut iovs[i];
                h.msg_iovlen = 1;
                h.msg_control = cmsgs[i].0.as_mut_ptr().cast();
                // size_t in glibc, socklen_t in musl.
                h.msg_controllen = size_of::<Cmsg>() as _;
                libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                }
            })
            .collect();
        // SAFETY: every mmsghdr points at address, buffer and control space that
        // live until the call returns, with their sizes; the kernel writes at most
        // that much into each.
        let n = cvt(unsafe {
            libc::recvmmsg(
                self.raw(),
                hdrs.as_mut_ptr(),
                count as libc::c_uint,
                // The flags are an int in glibc, an unsigned int in musl.
                libc::MSG_WAITFORONE as _,
                std::ptr::null_mut(),
            )
        })? as usize;
        batch.meta.clear();
        for (i, h) in hdrs.iter().take(n).enumerate() {
            let mut segment_size = None;
            // SAFETY: the kernel set msg_controllen to what it wrote in the control
            // buffer; CMSG_FIRSTHDR/CMSG_NXTHDR walk only within it, and a UDP_GRO
            // message carries an int after its header.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                        segment_size = u16::try_from(v).ok();
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
            let src = from_sockaddr(&addrs[i])
                .unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
            let len = h.msg_len as usize;
            // A GRO "run" of one datagram is just a datagram.
            let segment_size = segment_size.filter(|s| usize::from(*s) < len);
            batch.meta.push(RecvMeta {
                len,
                src,
                segment_size,
            });
        }
        Ok(n)
    }
}

impl AsRawFd for BatchSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for BatchSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The sleeve's two sockets on one address (see the module documentation).
#[derive(Debug)]
pub struct SleeveSockets {
    /// Receives everything (GRO on if the kernel has it); sends without DF.
    pub main: BatchSocket,
    /// Sends with DF; receives nothing.
    pub df: BatchSocket,
    /// Whether GRO is on for `main`.
    pub gro: bool,
}

impl SleeveSockets {
    /// Binds both sockets to `addr` (port [`SLEEVE_PORT`] in the agent).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let main = BatchSocket::bind(addr, true)?;
        // A port of 0 becomes a real one: the DF socket joins that one.
        let addr = main.local_addr()?;
        main.set_pmtud(Pmtud::Dont)?;
        let df = BatchSocket::bind(addr, true)?;
        df.set_pmtud(Pmtud::Do)?;
        // Steer every datagram to the group's first socket (`main`): a classic BPF
        // program of one instruction, `ret #0`.
        let mut prog = [libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        }];
        let fprog = libc::sock_fprog {
            len: 1,
            filter: prog.as_mut_ptr(),
        };
        setsockopt(
            main.raw(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &fprog,
        )?;
        let gro = main.enable_gro()?;
        Ok(Self { main, df, gro })
    }

    /// The socket to send with: `df` for DF datagrams.
    pub fn sender(&self, df: bool) -> &BatchSocket {
        if df { &self.df } else { &self.main }
    }
}

/// The kernel's path MTU towards `dst` (`IP_MTU`/`IPV6_MTU` on a connected
/// throwaway socket; connecting a UDP socket sends nothing). Read it after a DF send
/// failed with `EMSGSIZE`.
pub fn path_mtu(dst: SocketAddr) -> io::Result<u32> {
    let s = BatchSocket::new(dst.is_ipv6())?;
    let (ss, len) = to_sockaddr(&dst);
    // SAFETY: `ss` holds a sockaddr of `len` bytes.
    cvt(unsafe { libc::connect(s.raw(), (&ss as *const libc::sockaddr_storage).cast(), len) })?;
    let (level, name) = if s.v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `mtu` and `len` are live and `len` is `mtu`'s size.
    cvt(unsafe {
        libc::getsockopt(
            s.raw(),
            level,
            name,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    u32::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::testnet;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// Receives until `want` datagrams came (GRO runs split), with a timeout.
    fn recv_datagrams(s: &BatchSocket, want: usize) -> Vec<(SocketAddr, Option<u16>, Vec<u8>)> {
        s.set_nonblocking(true).unwrap();
        let mut batch = RecvBatch::new(16, GRO_BUF_LEN);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out with {} of {want}",
                got.len()
            );
            match s.recv_batch(&mut batch) {
                Ok(n) => {
                    for i in 0..n {
                        let m = batch.meta()[i];
                        for d in batch.datagrams(i) {
                            got.push((m.src, m.segment_size, d.to_vec()));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        got
    }

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    #[test]
    fn batch_round_trip_and_steering() {
        let sleeve = SleeveSockets::bind(loopback()).unwrap();
        let addr = sleeve.main.local_addr().unwrap();
        assert_eq!(sleeve.df.local_addr().unwrap(), addr, "both on one port");
        let clients: Vec<BatchSocket> = (0..4)
            .map(|_| BatchSocket::bind(loopback(), false).unwrap())
            .collect();
        let data: Vec<Vec<u8>> = (0..40).map(|i| datagram(i, 1 + i * 37)).collect();
        for (c, chunk) in clients.iter().zip(data.chunks(10)) {
            let msgs: Vec<SendMsg> = chunk
                .iter()
                .map(|d| SendMsg {
                    dst: addr,
                    data: d,
                    segment_size: None,
                })
                .collect();
            assert_eq!(c.send_batch(&msgs).unwrap(), 10);
        }
        let got = recv_datagrams(&sleeve.main, 40);
        for (i, (src, _, d)) in got.iter().enumerate() {
            assert_eq!(*d, data[i], "datagram {i}");
            assert_eq!(*src, clients[i / 10].local_addr().unwrap());
        }
        // Nothing reached the DF socket.
        let mut batch = RecvBatch::new(4, 2048);
        sleeve.df.set_nonblocking(true).unwrap();
        let e = sleeve.df.recv_batch(&mut batch).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);

        // Replies to per-datagram destinations, from both sockets, from the sleeve port.
        let msgs: Vec<SendMsg> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| SendMsg {
                dst: c.local_addr().unwrap(),
                data: &data[i],
                segment_size: None,
            })
            .collect();
        assert_eq!(sleeve.main.send_batch(&msgs[..2]).unwrap(), 2);
        assert_eq!(sleeve.df.send_batch(&msgs[2..]).unwrap(), 2);
        for (i, c) in clients.iter().enumerate() {
            let got = recv_datagrams(c, 1);
            assert_eq!(got[0].0, addr);
            assert_eq!(got[0].2, data[i]);
        }
    }

    #[test]
    fn gso_send_and_gro_receive() {
        let sleeve = SleeveSockets::bind(loopback()).unwrap();
        let addr = sleeve.main.local_addr().unwrap();
        let plain = BatchSocket::bind(loopback(), false).unwrap();
        let client = BatchSocket::bind(loopback(), false).unwrap();
        let run: Vec<u8> = (0..20)
            .flat_map(|i| datagram(i, 1000))
            .chain(datagram(99, 300))
            .collect();
        let msgs = [
            SendMsg {
                dst: addr,
                data: &run,
                segment_size: Some(1000),
            },
            SendMsg {
                dst: plain.local_addr().unwrap(),
                data: &run,
                segment_size: Some(1000),
            },
        ];
        assert_eq!(client.send_batch(&msgs).unwrap(), 2);
        let want: Vec<Vec<u8>> = run.chunks(1000).map(<[u8]>::to_vec).collect();
        // GRO on: the run arrives in one buffer with its segment size.
        let got = recv_datagrams(&sleeve.main, 21);
        assert_eq!(got.iter().map(|g| g.2.clone()).collect::<Vec<_>>(), want);
        println!(
            "UDP GSO works; GRO on the sleeve socket: {}, segment size seen: {:?}",
            sleeve.gro, got[0].1
        );
        if sleeve.gro {
            assert!(got.iter().all(|g| g.1 == Some(1000)), "one GRO run");
        }
        // GRO off: the kernel splits the run into datagrams.
        let got = recv_datagrams(&plain, 21);
        assert!(got.iter().all(|g| g.1.is_none()));
        assert_eq!(got.iter().map(|g| g.2.clone()).collect::<Vec<_>>(), want);
    }

    #[test]
    fn df_and_path_mtu_in_a_netns() {
        testnet::in_netns("df_and_path_mtu_in_a_netns", || {
            testnet::set_up("lo", 0);
            testnet::set_mtu("lo", 1400);
            let sleeve = SleeveSockets::bind(loopback()).unwrap();
            let addr = sleeve.main.local_addr().unwrap();
            let big = datagram(1, 2000);
            let msg = [SendMsg {
                dst: addr,
                data: &big,
                segment_size: None,
            }];
            let e = sleeve.df.send_batch(&msg).unwrap_err();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::EMSGSIZE),
                "DF above the MTU: {e}"
            );
            assert_eq!(path_mtu(addr).unwrap(), 1400);
            // Without DF the kernel fragments, and the datagram arrives whole.
            assert_eq!(sleeve.main.send_batch(&msg).unwrap(), 1);
            let got = recv_datagrams(&sleeve.main, 1);
            assert_eq!(got[0].2, big);
            // A DF datagram that fits goes.
            let small = datagram(2, 1400 - 28);
            let msg = [SendMsg {
                dst: addr,
                data: &small,
                segment_size: None,
            }];
            assert_eq!(sleeve.df.send_batch(&msg).unwrap(), 1);
            assert_eq!(recv_datagrams(&sleeve.main, 1)[0].2, small);
        });
    }
}
