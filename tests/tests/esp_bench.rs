//! The IPsec bench (`weft-fastdp-esp` against kernel VXLAN with the same ESP SAs set
//! by hand), run in the VM of `cargo xtask vm-test esp_bench`, where the kernel has
//! ESP. It prints ratios of one run (never asserted: a noisy, emulated machine); it
//! asserts only that every transfer completed. Needs root, `WEFT_AGENT_BIN` and a
//! kernel with ESP (it prints a `SKIPPED` line elsewhere).

mod common;

use std::time::Duration;

use common::{FIRST_CONTACT, Must, agent_bin, bed, established_over, wait_connection};
use weft_testbed::{Testbed, kernel_has_esp, ns_exec, ping, tcp_transfer, wait_ping};

/// Bytes per transfer (TCG's ESP carries tens of Mbit/s).
const BYTES: u64 = 8 << 20;
/// Rounds per mode, alternating.
const ROUNDS: usize = 3;
/// The key both hand-set SA pairs use (a bench, not a secret).
const KEY: &str = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223";

/// One measurement: TCP Mbit/s pod 1 -> pod 2, and the mean ping RTT in ms.
fn measure(tb: &Testbed) -> (f64, f64) {
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("first contact");
    let t = tcp_transfer(&p1, &p2, BYTES).must("tcp");
    assert_eq!(t.bytes_received, BYTES, "the transfer completed");
    let r = ping(&p1, p2.addr, 20).must("ping");
    assert_eq!(r.received, 20, "{r:?}");
    (t.bits_per_second / 1e6, r.mean_rtt_ms().unwrap_or(f64::NAN))
}

/// weft with a password: the encrypted fast datapath (weft's own SAs).
fn weft_esp() -> Vec<(f64, f64)> {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    for (n, peers) in [(1u8, &[][..]), (2, &[1u8][..])] {
        let file = tb.dir().join(format!("h{n}.password"));
        std::fs::write(&file, "bench").expect("password file");
        let file = file.display().to_string();
        tb.start_mesh_agent(n, &bin, peers, &["--password-file", &file])
            .must("agent");
    }
    for (n, peer) in [(1u8, 2u8), (2, 1)] {
        let c = wait_connection(
            &tb,
            n,
            peer,
            Duration::from_secs(30),
            established_over("fastdp"),
        );
        assert_eq!(c["encrypted"], true, "{c}");
    }
    (0..ROUNDS).map(|_| measure(&tb)).collect()
}

/// Two kernel-VXLAN hosts in Weave's layout with ESP SAs and policies set by hand:
/// the same algorithm, mode, ESN and replay window as weft's.
fn kernel_esp() -> Vec<(f64, f64)> {
    let mut tb = bed(2, 1);
    tb.make_kernel_vxlan_host(1, &[2]).must("kernel host 1");
    tb.make_kernel_vxlan_host(2, &[1]).must("kernel host 2");
    let (a1, a2) = (
        tb.host(1).must("host").addr.to_string(),
        tb.host(2).must("host").addr.to_string(),
    );
    for n in [1u8, 2] {
        let ns = tb.host(n).must("host").ns.clone();
        let (me, peer) = if n == 1 { (&a1, &a2) } else { (&a2, &a1) };
        for (src, dst, spi) in [(&a1, &a2, "0x1001"), (&a2, &a1, "0x2001")] {
            ns_exec(
                &ns,
                &[
                    "ip",
                    "xfrm",
                    "state",
                    "add",
                    "src",
                    src,
                    "dst",
                    dst,
                    "proto",
                    "esp",
                    "spi",
                    spi,
                    "reqid",
                    "1",
                    "mode",
                    "transport",
                    "replay-window",
                    "256",
                    "flag",
                    "esn",
                    "aead",
                    "rfc4106(gcm(aes))",
                    KEY,
                    "128",
                ],
            )
            .must("ip xfrm state add");
        }
        let spi = if n == 1 { "0x1001" } else { "0x2001" };
        ns_exec(
            &ns,
            &[
                "ip",
                "xfrm",
                "policy",
                "add",
                "src",
                &format!("{me}/32"),
                "dst",
                &format!("{peer}/32"),
                "proto",
                "udp",
                "dir",
                "out",
                "tmpl",
                "src",
                me,
                "dst",
                peer,
                "proto",
                "esp",
                "spi",
                spi,
                "reqid",
                "1",
                "mode",
                "transport",
            ],
        )
        .must("ip xfrm policy add");
    }
    (0..ROUNDS).map(|_| measure(&tb)).collect()
}

#[test]
fn weft_fastdp_esp_against_kernel_vxlan_esp() {
    if !kernel_has_esp() {
        eprintln!(
            "SKIPPED weft_fastdp_esp_against_kernel_vxlan_esp: this kernel has no ESP; run \
             `cargo xtask vm-test esp_bench`"
        );
        return;
    }
    let mut weft = Vec::new();
    let mut kernel = Vec::new();
    // Alternate the modes, so a slow phase of the machine hits both.
    for _ in 0..2 {
        weft.extend(weft_esp());
        kernel.extend(kernel_esp());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut wt, mut wr): (Vec<f64>, Vec<f64>) = weft.iter().copied().unzip();
    let (mut kt, mut kr): (Vec<f64>, Vec<f64>) = kernel.iter().copied().unzip();
    let (wt, wr, kt, kr) = (
        median(&mut wt),
        median(&mut wr),
        median(&mut kt),
        median(&mut kr),
    );
    eprintln!(
        "ESP bench (one run, medians of {} rounds each; ratios only mean something within this run):",
        weft.len()
    );
    eprintln!("| | weft-fastdp-esp | kernel VXLAN + ESP | weft / kernel |");
    eprintln!("|---|--:|--:|--:|");
    eprintln!(
        "| TCP 1 stream, Mbit/s | {wt:.1} | {kt:.1} | {:.2}x |",
        wt / kt
    );
    eprintln!(
        "| ping RTT, ms (lower is better) | {wr:.2} | {kr:.2} | {:.2}x |",
        wr / kr
    );
    eprintln!("all rounds, weft: {weft:?}; kernel: {kernel:?}");
}
