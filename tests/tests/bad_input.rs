//! Bad input: the agent exits nonzero with a clear message, without panicking and
//! without leaving devices behind, whether it fails before touching the kernel or
//! after creating its devices. Need root and `WEFT_AGENT_BIN` (the attach failure
//! also `WEFT_EBPF_OBJECT`).

mod common;

use std::{path::Path, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType},
};
use common::{Bed, Must, agent_bin, bed};
use weft_common::maps::{MACS_MAP, programs};
use weft_testbed::{links_with_prefix, netns, ns_exec, tcx_programs};

/// Runs the agent on host 1 with `args`, expecting a clean failure whose output
/// mentions (case-insensitively) at least one of each group in `mentions`.
fn expect_failure(tb: &Bed, bin: &Path, args: Vec<String>, case: &str, mentions: &[&[&str]]) {
    let exit = tb
        .run_agent_to_exit(1, bin, &args, Duration::from_secs(10))
        .must(&format!("{case}: agent should exit by itself"));
    let out = exit.output.to_lowercase();
    assert!(
        exit.status.code().is_some_and(|c| c != 0),
        "{case}: expected a nonzero exit code, got {:?}; output:\n{}",
        exit.status,
        exit.output
    );
    assert!(
        !out.contains("panicked"),
        "{case}: the agent panicked:\n{}",
        exit.output
    );
    for group in mentions {
        assert!(
            group.iter().any(|m| out.contains(&m.to_lowercase())),
            "{case}: expected the message to mention one of {group:?}; output:\n{}",
            exit.output
        );
    }
    let ns = &tb.host(1).must("host").ns;
    let left = links_with_prefix(ns, "vethwe-").must("ip link");
    assert!(left.is_empty(), "{case}: devices left behind: {left:?}");
    assert!(!tb.socket_path(1).exists(), "{case}: socket left behind");
}

fn with_arg(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).expect("flag present");
    args[i + 1] = value.to_string();
    args
}

/// Host 1's agent arguments plus `flag value`.
fn args_plus(tb: &Bed, flag: &str, value: &str) -> Vec<String> {
    let mut args = tb.agent_args(1).must("args");
    args.extend([flag.to_owned(), value.to_owned()]);
    args
}

/// [`expect_failure`] on a fresh two-host testbed whose host 1 runs the agent with
/// its usual arguments plus `flag value`; returns the testbed for further checks.
fn expect_failure_plus(flag: &str, value: &str, case: &str, mentions: &[&[&str]]) -> Bed {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    expect_failure(&tb, &bin, args_plus(&tb, flag, value), case, mentions);
    tb
}

fn peers(entries: &[(&str, &str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(name, nick, id, addr)| {
            let mut s = String::from("[[peer]]\n");
            for (k, v) in [
                ("name", name),
                ("nickname", nick),
                ("short_id", id),
                ("address", addr),
            ] {
                if !v.is_empty() {
                    s.push_str(&format!("{k} = {v}\n"));
                }
            }
            s + "\n"
        })
        .collect()
}

fn write(tb: &Bed, text: &str) {
    std::fs::write(tb.peers_path(1), text).expect("write peers file");
}

const H1: (&str, &str, &str, &str) = (
    "\"aa:00:00:00:00:01\"",
    "\"host1\"",
    "1",
    "\"192.168.48.11\"",
);

#[test]
fn missing_interface() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    let args = with_arg(tb.agent_args(1).must("args"), "--iface", "nosuch0");
    expect_failure(&tb, &bin, args, "missing interface", &[&["nosuch0"]]);
}

#[test]
fn malformed_address_in_peers_file() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    write(
        &tb,
        &peers(&[
            H1,
            (
                "\"aa:00:00:00:00:02\"",
                "\"host2\"",
                "2",
                "\"192.168.48.999\"",
            ),
        ]),
    );
    expect_failure(
        &tb,
        &bin,
        tb.agent_args(1).must("args"),
        "malformed address",
        &[
            &["address"],
            &["192.168.48.999", "aa:00:00:00:00:02", "host2", "peer 2"],
        ],
    );
}

#[test]
fn missing_field_in_peers_file() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    write(
        &tb,
        &peers(&[
            H1,
            (
                "\"aa:00:00:00:00:02\"",
                "\"host2\"",
                "",
                "\"192.168.48.12\"",
            ),
        ]),
    );
    expect_failure(
        &tb,
        &bin,
        tb.agent_args(1).must("args"),
        "missing short_id",
        &[&["short_id"]],
    );
}

#[test]
fn duplicate_short_id() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    write(
        &tb,
        &peers(&[
            H1,
            (
                "\"aa:00:00:00:00:02\"",
                "\"host2\"",
                "1",
                "\"192.168.48.12\"",
            ),
        ]),
    );
    expect_failure(
        &tb,
        &bin,
        tb.agent_args(1).must("args"),
        "duplicate short_id",
        &[
            &["short_id", "short id", "shortid"],
            &["duplicate", "twice", "already", "more than once", "same"],
        ],
    );
}

#[test]
fn own_name_absent_from_peers_file() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    let args = with_arg(tb.agent_args(1).must("args"), "--name", "aa:00:00:00:00:99");
    expect_failure(
        &tb,
        &bin,
        args,
        "own name absent",
        &[&["aa:00:00:00:00:99"]],
    );
}

#[test]
fn no_bpf_privileges() {
    use std::os::unix::fs::PermissionsExt;

    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    // An unprivileged user must be able to reach the binary and the peers file.
    let dir = std::env::temp_dir().join(format!("weft-nopriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("temp dir: {e}"));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod dir: {e}"));
    let copy = dir.join("weft");
    std::fs::copy(&bin, &copy).unwrap_or_else(|e| panic!("copy agent: {e}"));
    let peers = dir.join("peers.toml");
    std::fs::copy(tb.peers_path(1), &peers).unwrap_or_else(|e| panic!("copy peers file: {e}"));
    std::fs::set_permissions(&peers, std::fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    let mut args: Vec<String> = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ]
    .map(String::from)
    .to_vec();
    args.push(copy.display().to_string());
    args.extend(with_arg(
        tb.agent_args(1).must("args"),
        "--peers-file",
        &peers.display().to_string(),
    ));
    expect_failure(
        &tb,
        Path::new("setpriv"),
        args,
        "running as an unprivileged user",
        &[&["permission denied"], &["root", "cap_bpf"]],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn underlay_mtu_too_small() {
    // 1451 + 50 bytes of encapsulation do not fit the underlay's 1500.
    expect_failure_plus(
        "--mtu",
        "1451",
        "underlay MTU too small",
        &[&["--mtu 1451"], &["at least 1501"], &["eth0 has 1500"]],
    );
}

/// Fails after the eBPF object is loaded and the control socket bound, before any
/// device is created.
#[test]
fn bridge_name_taken_by_another_device() {
    let tb = expect_failure_plus(
        "--bridge",
        "eth0",
        "bridge name taken",
        &[&["eth0"], &["not a bridge"]],
    );
    let ns = &tb.host(1).must("host").ns;
    let eth0 = ns_exec(ns, &["ip", "-o", "link", "show", "eth0"]).must("eth0 still there");
    assert!(eth0.contains("state UP"), "eth0 left as it was:\n{eth0}");
}

/// The latest failure there is: attaching the second program, after the agent
/// created its bridge and veth pair, filled its maps and attached the first program
/// (to the veth pair, which therefore existed). Host 1's eth0 ingress already holds
/// as many TCX programs as the kernel allows, so attaching weft's is refused.
#[test]
fn attach_failure_after_devices_exist() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    let ns = tb.host(1).must("host").ns.clone();
    let fillers = fill_tcx_ingress(&ns);
    let filler_ids: Vec<u32> = attached_ids(&ns);
    assert!(!filler_ids.is_empty(), "eth0 ingress holds the fillers");

    let bridge = "weftnew0";
    expect_failure(
        &tb,
        &bin,
        args_plus(&tb, "--bridge", bridge),
        "attach refused",
        &[&["attaching"], &[programs::INGRESS], &["out of range"]],
    );
    let bridges = links_with_prefix(&ns, bridge).must("ip link");
    assert!(
        bridges.is_empty(),
        "the bridge the agent created is left behind: {bridges:?}"
    );
    assert_eq!(
        attached_ids(&ns),
        filler_ids,
        "eth0 ingress holds exactly the fillers again"
    );
    drop(fillers);
    assert!(attached_ids(&ns).is_empty(), "fillers detached");
}

/// Ids of the programs TCX-attached to eth0's ingress in `ns`.
fn attached_ids(ns: &str) -> Vec<u32> {
    tcx_programs(ns, "eth0")
        .must("TCX query")
        .into_iter()
        .filter(|p| p.direction == "ingress")
        .map(|p| p.id)
        .collect()
}

/// Attaches programs to eth0's TCX ingress in `ns` until the kernel refuses one more
/// (it allows 64 per hook). Each is weft's decapsulation program from
/// `WEFT_EBPF_OBJECT`, loaded separately (a hook takes a program only once) with a
/// one-entry MAC table. Dropping the returned objects detaches them.
fn fill_tcx_ingress(ns: &str) -> Vec<Ebpf> {
    const MORE_THAN_THE_LIMIT: usize = 256;
    let object = std::env::var_os("WEFT_EBPF_OBJECT")
        .expect("WEFT_EBPF_OBJECT not set: run through `cargo xtask test`");
    let object = std::fs::read(&object).unwrap_or_else(|e| panic!("reading {object:?}: {e}"));
    netns::join(
        netns::spawn_in(ns, move || {
            let mut attached = Vec::new();
            while attached.len() < MORE_THAN_THE_LIMIT {
                let mut ebpf = EbpfLoader::new()
                    .map_max_entries(MACS_MAP, 1)
                    .load(&object)?;
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(programs::INGRESS)
                    .ok_or_else(|| anyhow::anyhow!("no program {}", programs::INGRESS))?
                    .try_into()?;
                prog.load()?;
                match prog.attach(c"eth0", TcAttachType::Ingress) {
                    Ok(_) => attached.push(ebpf),
                    Err(e) if attached.is_empty() => return Err(e.into()),
                    Err(_) => return Ok(attached),
                }
            }
            anyhow::bail!("eth0 took {MORE_THAN_THE_LIMIT} TCX programs without refusing one")
        }),
        "filling eth0's TCX ingress",
    )
    .must("filling eth0's TCX ingress")
}
