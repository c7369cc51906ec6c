//! A reader for the classic pcap file format (what `tcpdump -w` writes), and packet
//! capture on a testbed host.
//!
//! Format: a 24-byte global header (magic, version, zone, sigfigs, snaplen, link
//! type), then per packet a 16-byte record header (seconds, sub-seconds, captured
//! length, original length) followed by the captured bytes. The magic's byte order
//! tells the file's byte order.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::cmd::{POLL, command_line, describe_status, kill_group, signal_group, wait_bounded};

/// Link type of Ethernet captures.
pub const LINKTYPE_ETHERNET: u32 = 1;

/// One captured packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Capture time since the Unix epoch.
    pub timestamp: Duration,
    /// Length of the packet on the wire (may exceed `data.len()` if truncated).
    pub orig_len: u32,
    /// The captured bytes, starting with the link-layer header.
    pub data: Vec<u8>,
}

/// Parses a pcap file's bytes. Fails on a bad magic, a link type other than Ethernet,
/// or a record running past the end (except a final record cut short, which a capture
/// killed mid-write can leave and which is dropped).
pub fn parse(bytes: &[u8]) -> Result<Vec<Packet>> {
    ensure!(
        bytes.len() >= 24,
        "pcap file too short for its header ({} bytes)",
        bytes.len()
    );
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let (le, nanos) = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] => (true, false),
        [0xa1, 0xb2, 0xc3, 0xd4] => (false, false),
        [0x4d, 0x3c, 0xb2, 0xa1] => (true, true),
        [0xa1, 0xb2, 0x3c, 0x4d] => (false, true),
        _ => bail!("not a pcap file: magic {magic:02x?}"),
    };
    let u32_at = |off: usize| {
        let b = [bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]];
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let link = u32_at(20);
    ensure!(
        link == LINKTYPE_ETHERNET,
        "pcap link type {link}, expected Ethernet (1)"
    );
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= bytes.len() {
        let secs = u32_at(off);
        let frac = u32_at(off + 4);
        let incl = u32_at(off + 8) as usize;
        let orig = u32_at(off + 12);
        let start = off + 16;
        if start + incl > bytes.len() {
            break;
        }
        let sub = if nanos {
            frac
        } else {
            frac.saturating_mul(1000)
        };
        out.push(Packet {
            timestamp: Duration::new(u64::from(secs), sub),
            orig_len: orig,
            data: bytes[start..start + incl].to_vec(),
        });
        off = start + incl;
    }
    Ok(out)
}

/// A running `tcpdump` writing to a file; [`Capture::finish`] stops it and returns the
/// packets.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    line: String,
    file: PathBuf,
    errfile: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i <iface> -c <count> -w <file> <filter>` in namespace `ns` and
    /// waits (up to 5 s) until it is listening. `file` is overwritten.
    pub fn start(ns: &str, iface: &str, filter: &str, count: usize, file: &Path) -> Result<Self> {
        let errfile = file.with_extension("stderr");
        let err = File::create(&errfile)
            .with_context(|| format!("cannot create {}", errfile.display()))?;
        let count_s = count.to_string();
        let mut cmd = crate::cmd::ns_command(ns, "tcpdump");
        cmd.args([
            "-i", iface, "-n", "-U", "-Z", "root", "-s", "0", "-c", &count_s, "-w",
        ])
        .arg(file)
        .args(filter.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let line = command_line(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        let mut cap = Capture {
            child: Some(child),
            line,
            file: file.to_path_buf(),
            errfile,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stderr = std::fs::read_to_string(&cap.errfile).unwrap_or_default();
            if stderr.contains("listening on") {
                return Ok(cap);
            }
            if let Some(child) = cap.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "`{}` exited before listening ({}): {}",
                    cap.line,
                    describe_status(&status),
                    stderr.trim()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "`{}` not listening after 5 s; stderr: {}",
                    cap.line,
                    stderr.trim()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` for the capture to reach its packet count, then stops it
    /// (SIGINT, which flushes the file) and returns every packet captured, possibly
    /// fewer than asked for: callers check what they need.
    pub fn finish(mut self, timeout: Duration) -> Result<Vec<Packet>> {
        if let Some(mut child) = self.child.take() {
            let done = wait_bounded(&mut child, timeout)?;
            if done.is_none() {
                signal_group(child.id(), libc::SIGINT);
                if wait_bounded(&mut child, Duration::from_secs(3))?.is_none() {
                    kill_group(&mut child);
                }
            }
        }
        let bytes = std::fs::read(&self.file).with_context(|| {
            format!(
                "`{}` left no readable capture file; stderr: {}",
                self.line,
                std::fs::read_to_string(&self.errfile)
                    .unwrap_or_default()
                    .trim()
            )
        })?;
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        parse(&bytes)
            .with_context(|| format!("capture file {} of `{}`", self.file.display(), self.line))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }
}

/// Runs `tcpdump` on `iface` in `ns` with `filter` while `during` runs, then returns
/// the packets captured (at most `count`, waiting up to `timeout` after `during`
/// returns for the count to be reached).
pub fn capture_while(
    ns: &str,
    iface: &str,
    filter: &str,
    count: usize,
    timeout: Duration,
    file: &Path,
    during: impl FnOnce() -> Result<()>,
) -> Result<Vec<Packet>> {
    let cap = Capture::start(ns, iface, filter, count, file)?;
    during()?;
    cap.finish(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(le: bool, nanos: bool, recs: &[(&[u8], u32)]) -> Vec<u8> {
        let w32 = |v: u32| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let w16 = |v: u16| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let mut b = Vec::new();
        b.extend(w32(if nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 }));
        b.extend(w16(2));
        b.extend(w16(4));
        b.extend(w32(0));
        b.extend(w32(0));
        b.extend(w32(65535));
        b.extend(w32(1));
        for (i, (data, orig)) in recs.iter().enumerate() {
            b.extend(w32(100 + i as u32));
            b.extend(w32(7));
            b.extend(w32(data.len() as u32));
            b.extend(w32(*orig));
            b.extend(*data);
        }
        b
    }

    #[test]
    fn parses_both_byte_orders_and_precisions() {
        for (le, nanos) in [(true, false), (false, false), (true, true), (false, true)] {
            let f = file(le, nanos, &[(&[1, 2, 3], 3), (&[4; 10], 60)]);
            let p = parse(&f).unwrap();
            assert_eq!(p.len(), 2);
            assert_eq!(p[0].data, vec![1, 2, 3]);
            assert_eq!(p[1].data, vec![4; 10]);
            assert_eq!(p[1].orig_len, 60);
            assert_eq!(
                p[0].timestamp,
                Duration::new(100, if nanos { 7 } else { 7000 })
            );
        }
    }

    #[test]
    fn drops_a_cut_final_record_and_rejects_garbage() {
        let mut f = file(true, false, &[(&[1, 2, 3], 3), (&[9; 8], 8)]);
        f.truncate(f.len() - 2);
        assert_eq!(parse(&f).unwrap().len(), 1);
        assert!(parse(&[0u8; 24]).is_err());
        assert!(parse(&[0xd4, 0xc3]).is_err());
        let mut raw_ip = file(true, false, &[]);
        raw_ip[20] = 101;
        assert!(format!("{:#}", parse(&raw_ip).unwrap_err()).contains("link type 101"));
    }
}
