//! The network namespace cookie (`SO_NETNS_COOKIE`, Linux 5.14+): unique for the
//! life of the system, unlike a namespace's inode number. The agent names its pin
//! directory `<bpffs>/weft/netns-<cookie>` after it.

use std::{io, os::fd::AsRawFd};

/// The cookie of the calling thread's network namespace.
pub fn cookie() -> io::Result<u64> {
    // Any socket will do; the wildcard address binds even with loopback down.
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` (8) bytes into `cookie`, a live u64,
    // and updates `len`; the socket fd is open for the whole call.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The name of the pin directory of the namespace with `cookie`, under
/// `<bpffs>/weft/`.
pub fn pin_dir_name(cookie: u64) -> String {
    format!("netns-{cookie}")
}
