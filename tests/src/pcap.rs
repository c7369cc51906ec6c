//! Packet capture on a testbed host: `tcpdump -w` into a file, read back with
//! pcap-file.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use pcap_file::{DataLink, PcapError, pcap::PcapParser};

use crate::cmd::{POLL, command_line, describe_status, kill_group, signal_group, wait_bounded};

/// One captured packet (timestamp, length on the wire, captured bytes starting with
/// the Ethernet header), owning its bytes.
pub type Packet = pcap_file::pcap::PcapPacket<'static>;

/// Parses the bytes of a classic pcap file (what `tcpdump -w` writes, either byte
/// order and timestamp precision). Fails on a bad header, a link type other than
/// Ethernet, or a malformed record; a final record cut short, which a capture killed
/// mid-write can leave, is dropped.
pub fn parse(bytes: &[u8]) -> Result<Vec<Packet>> {
    let (mut rest, parser) = PcapParser::new(bytes).context("not a pcap file")?;
    let link = parser.header().datalink;
    ensure!(
        link == DataLink::ETHERNET,
        "pcap link type {link:?}, expected Ethernet"
    );
    let mut packets = Vec::new();
    while !rest.is_empty() {
        match parser.next_packet(rest) {
            Ok((next, packet)) => {
                packets.push(packet.into_owned());
                rest = next;
            }
            Err(PcapError::IncompleteBuffer) => break,
            Err(e) => return Err(e).with_context(|| format!("pcap record {}", packets.len() + 1)),
        }
    }
    Ok(packets)
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
    use pcap_file::{
        Endianness, TsResolution,
        pcap::{PcapHeader, PcapPacket, PcapWriter},
    };

    use super::*;

    /// A pcap file holding `records` (captured bytes, length on the wire), stamped
    /// 100 s + 7 us, 101 s + 7 us, ...
    fn file(header: PcapHeader, records: &[(&[u8], u32)]) -> Vec<u8> {
        let mut writer = PcapWriter::with_header(Vec::new(), header).unwrap();
        for (i, (data, orig_len)) in (0u64..).zip(records) {
            let ts = Duration::new(100 + i, 7_000);
            writer
                .write_packet(&PcapPacket::new(ts, *orig_len, data))
                .unwrap();
        }
        writer.into_writer()
    }

    #[test]
    fn parses_both_byte_orders_and_precisions() {
        for endianness in [Endianness::Little, Endianness::Big] {
            for ts_resolution in [TsResolution::MicroSecond, TsResolution::NanoSecond] {
                let header = PcapHeader {
                    endianness,
                    ts_resolution,
                    ..PcapHeader::default()
                };
                let f = file(header, &[(&[1, 2, 3], 3), (&[4; 10], 60)]);
                let p = parse(&f).unwrap();
                assert_eq!(p.len(), 2);
                assert_eq!(*p[0].data, [1, 2, 3]);
                assert_eq!(*p[1].data, [4; 10]);
                assert_eq!(p[1].orig_len, 60);
                assert_eq!(p[0].timestamp, Duration::new(100, 7_000));
                assert_eq!(p[1].timestamp, Duration::new(101, 7_000));
            }
        }
    }

    #[test]
    fn drops_a_cut_final_record_and_rejects_garbage() {
        let mut f = file(PcapHeader::default(), &[(&[1, 2, 3], 3), (&[9; 8], 8)]);
        f.truncate(f.len() - 2);
        let p = parse(&f).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(*p[0].data, [1, 2, 3]);
        assert!(parse(&[0u8; 24]).is_err());
        assert!(parse(&[0xd4, 0xc3]).is_err());
        let raw_ip = file(
            PcapHeader {
                datalink: DataLink::RAW,
                ..PcapHeader::default()
            },
            &[],
        );
        let e = format!("{:#}", parse(&raw_ip).unwrap_err());
        assert!(e.contains("link type RAW"), "{e}");
    }

    #[test]
    fn empty_capture_has_no_packets() {
        assert!(parse(&file(PcapHeader::default(), &[])).unwrap().is_empty());
    }
}
